"""Evaluate stage: batch-1 online perplexity with memory carried over the whole split.

    python -m micronet.evaluate name=<run> [step=S] [splits=[valid,test]] [fast=true | amp=bf16]

Writes ``results/<name>/eval_step<S>.json`` (``eval_step<S>_n<N>.json`` with ``n_cache=N``) with loss (mean NLL, nats), ppl and tokens per split.
``fast=true`` evaluates the CPU inference model of :mod:`micronet.compress.fast_infer` (int8 kernels, no fake
quantization) instead, into ``eval_step<S>[_n<N>]_fast.json``; ``amp=bf16`` evaluates the same model under
bf16 autocast (log-probabilities, normalisers and cache in fp32) into ``eval_step<S>[_n<N>]_bf16.json``.
The reference files (which ``score`` reads) keep the exact fp32 model's figures.
"""

from __future__ import annotations

from omegaconf import DictConfig

from micronet.runs.cli import stage_main
from micronet.stagekit.evaluation import EvalConfig, evaluate_run

__all__ = ["EvalConfig", "main", "run"]


def run(cfg: DictConfig) -> dict:
    """Evaluate a run's checkpoint on the requested splits; returns the JSON written."""
    return evaluate_run(cfg)


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
