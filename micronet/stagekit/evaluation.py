"""The evaluate stage's work, as a library function: the evaluate stage and the closing evaluation of
derived runs (:func:`micronet.stagekit.score_run.evaluate_and_score`) both call :func:`evaluate_run`.

Writes ``results/<name>/eval_step<S>.json`` (``eval_step<S>_n<N>.json`` with ``n_cache=N``): loss (mean
NLL, nats), ppl and tokens per split; with ``fast=true`` the CPU inference model of
:mod:`micronet.compress.fast_infer` is evaluated instead, into ``eval_step<S>[_n<N>]_fast.json``; with
``amp=bf16`` the same model under bf16 autocast (log-probabilities, normalisers and cache in fp32), into
``eval_step<S>[_n<N>]_bf16.json``. The reference files (which ``score`` reads) keep the exact fp32 figures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from micronet.compress.fast_infer import build_fast_model
from micronet.model.cache import eval_cache_for
from micronet.model.evaluation import evaluate_stream
from micronet.runs.results import write_json
from micronet.stagekit.preamble import open_stage

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of the evaluate stage."""

    name: str = "???"
    step: int | str | None = None  # None: newest checkpoint
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    chunk_len: int = 4032  # tokens per forward pass; memory is carried between chunks
    device: str = "auto"
    n_cache: int = 0  # evaluation cache size (independent of training's); 0 = off
    fast: bool = False  # evaluate micronet.compress.fast_infer's int8 CPU inference model; results in *_fast.json
    amp: str = "none"  # none: exact fp32; bf16: bf16 autocast, results in *_bf16.json

    def validate(self) -> None:
        if self.chunk_len < 1 or self.n_cache < 0:
            raise ValueError(f"chunk_len must be positive and n_cache >= 0, got {self.chunk_len}, {self.n_cache}")
        if self.amp not in ("none", "bf16") or (self.fast and self.amp != "none"):
            raise ValueError(f"amp must be none or bf16 (and none with fast=true), got amp={self.amp!r}")
        bad = [s for s in self.splits if s not in ("train", "valid", "test")]
        if bad:
            raise ValueError(f"splits must be among train/valid/test, got {bad}")
        if self.fast:  # a CPU inference path (int8 CPU kernels): device=auto means the CPU here
            if self.device not in ("auto", "cpu"):
                raise ValueError(f"fast=true is a CPU inference path (int8 CPU kernels); use device=cpu, "
                                 f"not {self.device}")
            self.device = "cpu"


def evaluate_run(cfg: EvalConfig | DictConfig) -> dict:
    """Evaluate a run's checkpoint on the requested splits (the evaluate stage); returns the JSON written."""
    with open_stage("evaluate", EvalConfig, cfg) as st:
        ecfg, rd, model, device, step = st.cfg, st.run, st.model, st.device, st.step
        corpus = st.corpus()
        cache, cache_info = eval_cache_for(rd, step, ecfg.n_cache, model)  # (None, {"n_cache": 0}) when off
        if cache is not None:
            log.info("evaluation cache: %s", cache_info)
        out: dict = {"name": rd.name, "step": step}
        path = rd.eval_path(step, ecfg.n_cache)
        if ecfg.fast:
            model = build_fast_model(model)  # the checkpoint's effective weights (== its packed export's, if quantized)
            out["fast"] = model.fast
            path = path.with_name(f"{path.stem}_fast.json")
            log.info("fast inference model: %s", model.fast)
        if ecfg.amp == "bf16":
            out["amp"] = "bf16"
            path = path.with_name(f"{path.stem}_bf16.json")
        if path.exists():  # keep results of splits not evaluated this time
            out = {**json.loads(path.read_text()), **out}
        for split in ecfg.splits:
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ecfg.amp == "bf16"):
                nll, n = evaluate_stream(model, corpus.split(split), ecfg.chunk_len, device, desc=split, cache=cache)
            secs = time.perf_counter() - t0
            out[split] = {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n, "tokens_per_s": n / secs,
                          "cache": cache_info}
            log.info("%s step %d %s: ppl %.3f over %d tokens (%.0f tok/s)", rd.name, step, split,
                     out[split]["ppl"], n, n / secs)
        write_json(path, out)
    print(f"{rd.name} step {step}: " + ", ".join(f"{s} ppl {out[s]['ppl']:.2f}" for s in ecfg.splits))
    return out
