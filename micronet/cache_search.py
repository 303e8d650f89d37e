"""Cache search stage: tune the evaluation cache's (lambda, theta) on validation perplexity.

    python -m micronet.cache_search name=<run> n_cache=<N> [step=S]

The network runs once over the validation split (batch 1, online, memory carried) to get the
final hidden states and log p_model(target); every candidate (lambda, theta) is then scored from
those alone. p_cache(target) depends on theta only, so it is memoised per theta and a lambda
move costs one elementwise mixture. The search (spec section 3) is
:func:`micronet.model.cache_search.coordinate_search`;
the result goes to ``results/<name>/cache_step<S>_n<N>.yaml``, which evaluation then loads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from omegaconf import DictConfig

from micronet.model.cache import DEFAULT_LAMBDA, DEFAULT_THETA, model_cache, write_cache_params
from micronet.model.cache_search import CacheObjective, coordinate_search, hidden_states
from micronet.runs.cli import stage_main
from micronet.runs.progress import bar
from micronet.stagekit.preamble import open_stage

log = logging.getLogger(__name__)


@dataclass
class CacheSearchConfig:
    """Settings of the cache_search stage."""

    name: str = "???"
    step: int | str | None = None  # None: newest checkpoint
    n_cache: int = 3000
    chunk_len: int = 4032  # tokens per forward pass of the one network run
    val_tokens: int = 0  # search on the first N validation tokens; 0 = the whole split
    tol: float = 0.005  # stop when both step/value fall below this
    max_evals: int = 1000  # safety net; the search normally stops well before
    max_band_gb: float = 6.0  # keep the (N, n_cache) dot products in memory up to this size
    device: str = "auto"

    def validate(self) -> None:
        if self.n_cache < 1 or self.chunk_len < 1 or self.val_tokens < 0:
            raise ValueError("n_cache and chunk_len must be positive, val_tokens >= 0")
        if not 0.0 < self.tol < 1.0 or self.max_evals < 1 or self.max_band_gb < 0:
            raise ValueError("tol must be in (0, 1), max_evals >= 1 and max_band_gb >= 0")


def run(cfg: DictConfig) -> dict:
    """Search (lambda, theta) for ``n_cache`` on a run's checkpoint; writes and returns the result."""
    with open_stage("cache_search", CacheSearchConfig, cfg) as st:  # one atomic write: no guard, like evaluate
        scfg, rd, model, device, step = st.cfg, st.run, st.model, st.device, st.step
        corpus = st.corpus()
        tokens = corpus.valid[: scfg.val_tokens + 1] if scfg.val_tokens else corpus.valid
        t0 = time.perf_counter()
        h, lp_model, target = hidden_states(model, tokens, scfg.chunk_len, device)
        objective = CacheObjective(h, target, lp_model, scfg.n_cache, max_band_gb=scfg.max_band_gb)
        log.info("hidden states, dot products and matches of %d validation tokens in %.1fs (band %s)",
                 len(target), time.perf_counter() - t0, "in memory" if objective.band is not None else "recomputed")
        trained = model_cache(model)
        lam0, theta0 = trained.values() if trained is not None else (DEFAULT_LAMBDA, DEFAULT_THETA)
        no_cache = math.exp(-lp_model.mean().item())
        t0 = time.perf_counter()
        with bar(None, f"cache search n={scfg.n_cache}", "evals") as pbar:
            def show(lam: float, theta: float, ppl: float) -> None:
                pbar.update(status=f"lambda {lam:.5f} theta {theta:.5f} ppl {ppl:.3f}")

            res = coordinate_search(objective, lam0, theta0, scfg.tol, scfg.max_evals, show)
        secs = time.perf_counter() - t0
        out = {"name": rd.name, "step": step, "n_cache": scfg.n_cache, "lambda": res.lam, "theta": res.theta,
               "val_ppl": res.value, "val_ppl_no_cache": no_cache, "val_tokens": len(target),
               "evaluations": res.evals, "theta_evaluations": objective.theta_evals,
               "start": {"lambda": lam0, "theta": theta0}, "search_s": round(secs, 1)}
        write_cache_params(rd.cache_params_path(step, scfg.n_cache), scfg.n_cache, res.lam, res.theta,
                           **{k: v for k, v in out.items() if k not in ("name", "step", "n_cache", "lambda", "theta")})
        log.info("%s step %d n_cache %d: lambda %.6f theta %.6f val ppl %.3f (no cache %.3f), %d evaluations in %.0fs",
                 rd.name, step, scfg.n_cache, res.lam, res.theta, res.value, no_cache, res.evals, secs)
        print(f"{rd.name} step {step} n_cache {scfg.n_cache}: lambda {res.lam:.6f} theta {res.theta:.6f} "
              f"val ppl {res.value:.3f} (no cache {no_cache:.3f}); wrote {rd.cache_params_path(step, scfg.n_cache)}")
        return out


main = stage_main("cache_search", run)

if __name__ == "__main__":
    main()
