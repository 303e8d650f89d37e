"""Score stage: the MicroNet score of a run's checkpoint, both conventions.

    python -m micronet.score name=<run> [step=S] [convention=paper|strict] [n_cache=N] [bits=B] [free_16bit=true]

Writes ``results/<name>/score_step<S>.json`` (the main convention's breakdown, both conventions'
totals, the test perplexity of the matching evaluation) and prints the per-component table. The
counting is :mod:`micronet.scoring`; the work is :func:`micronet.stagekit.score_run.score_run`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from micronet.runs.cli import stage_main
from micronet.stagekit.score_run import ScoreConfig, score_run

__all__ = ["ScoreConfig", "main", "run"]


def run(cfg: DictConfig) -> dict:
    """Score a run's checkpoint under both conventions; writes ``score_step<S>.json``."""
    return score_run(cfg)


main = stage_main("score", run)

if __name__ == "__main__":
    main()
