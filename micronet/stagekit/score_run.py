"""The score stage's work as a library function, and the closing evaluate + score of derived runs.

:func:`score_run` scores a run's checkpoint under both conventions into ``score_step<S>.json``;
:func:`evaluate_and_score` is what the prune and quantize stages run when they finish.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from micronet.runs.config import ConfigError
from micronet.runs.results import searched_caches, write_json
from micronet.scoring.counts import bin_fractions, render_table, score_model
from micronet.scoring.rules import CONVENTIONS
from micronet.stagekit.evaluation import evaluate_run
from micronet.stagekit.preamble import open_stage

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """``python -m micronet.score name=<run> [step=S] [convention=paper|strict] [n_cache=N]``."""

    name: str = "???"
    step: int | str | None = None  # None: newest checkpoint
    convention: str = "paper"
    n_cache: int | None = None  # None: the largest searched cache of that step (cache_step<S>_n<N>.yaml), else 0
    bits: int | None = None  # None: from the checkpoint (quantized runs), else 32
    free_16bit: bool = False

    def validate(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {self.convention!r}")


def score_run(cfg: ScoreConfig | DictConfig) -> dict:
    """Score a run's checkpoint under both conventions; writes and returns ``score_step<S>.json``."""
    with open_stage("score", ScoreConfig, cfg) as st:
        scfg, rd, model, step = st.cfg, st.run, st.model, st.step
        quant = st.ckpt.get("quant") or {}
        bits = scfg.bits if scfg.bits is not None else int(quant.get("bits", 32))
        act_bits = int(quant.get("act_bits", bits))
        n_cache = scfg.n_cache
        if n_cache is None:
            n_cache = max(searched_caches(rd, step), default=0)
        fractions = bin_fractions(st.corpus(progress=False).test, model.cfg.cutoffs, model.cfg.vocab_size)
        results = {}
        for conv in (scfg.convention, *(c for c in sorted(CONVENTIONS) if c != scfg.convention)):
            try:
                results[conv] = score_model(model, bits=bits, act_bits=act_bits,
                                            n_act_quantizers=quant.get("n_act_quantizers"), n_cache=n_cache,
                                            bin_fractions=fractions, convention=conv, free_16bit=scfg.free_16bit,
                                            table_scales=quant.get("table_scales", "row"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        main_score = results[scfg.convention]
        print(render_table(main_score, group_layers=True))
        test_ppl = None
        eval_path = rd.eval_path(step, n_cache)  # one file per evaluation cache size
        if eval_path.exists():
            ev = json.loads(eval_path.read_text())
            # the cache an evaluation used is recorded per split (older files: at the top level)
            if "test" in ev and int((ev["test"].get("cache") or ev).get("n_cache", 0)) == n_cache:
                test_ppl = ev["test"]["ppl"]
        if test_ppl is None:
            log.warning("no test perplexity: %s has no test split with cache %d (run python -m micronet.evaluate "
                        "name=%s step=%d%s first); score_step%d.json records test_ppl null", eval_path, n_cache,
                        rd.name, step, f" n_cache={n_cache}" if n_cache else "", step)
        out = {"name": rd.name, "step": step, "test_ppl": test_ppl, **main_score.to_json(),
               "conventions": {c: {k: v for k, v in s.to_json().items() if k != "components"}
                               for c, s in results.items()}}
        write_json(rd.score_path(step), out)
        log.info("%s step %d: score %.6f (%s), params %.1f, ops %.1f, test ppl %s", rd.name, step,
                 main_score.score, scfg.convention, main_score.params, main_score.ops,
                 "missing" if test_ppl is None else f"{test_ppl:.2f}")
    return out


def evaluate_and_score(name: str, step: int, splits: list[str], chunk_len: int, n_cache: int = 0,
                       device: str = "auto") -> dict:
    """Evaluate ``splits`` (eval_step<S>.json) then score (score_step<S>.json) a finished run."""
    if splits:
        evaluate_run(OmegaConf.create({"name": name, "step": step, "splits": list(splits), "chunk_len": chunk_len,
                                       "device": device, "n_cache": n_cache}))
    return score_run(OmegaConf.create({"name": name, "step": step, "convention": "paper", "n_cache": n_cache,
                                       "bits": None, "free_16bit": False}))
