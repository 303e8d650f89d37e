"""Cache local search: tune the evaluation cache's (lambda, theta) on validation perplexity.

    python -m micronet.cache_search name=<run> n_cache=<N> [step=S]

The network runs once over the validation split (batch 1, online, memory carried) to get the
final hidden states and log p_model(target); every candidate (lambda, theta) is then scored from
those alone. p_cache(target) depends on theta only, so it is memoised per theta and a lambda
move costs one elementwise mixture. The search (spec section 3) is :func:`coordinate_search`;
the result goes to ``results/<name>/cache_step<S>_n<N>.yaml``, which evaluation then loads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from micronet.model.cache import DEFAULT_LAMBDA, DEFAULT_THETA, band_dots, mix_log_probs, model_cache, write_cache_params
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import typed
from micronet.data.corpus import DataConfig, load_corpus
from micronet.stagekit.evaluation import load_model, pick_device
from micronet.model.transformer import TransformerLM
from micronet.runs.progress import bar
from micronet.runs.results import CheckpointError, RunDir

log = logging.getLogger(__name__)


@dataclass
class CacheSearchConfig:
    """Settings of the cache_search stage."""

    name: str = "???"
    step: int | None = None  # None: newest checkpoint
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


@torch.no_grad()
def hidden_states(model: TransformerLM, tokens: np.ndarray, chunk_len: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One online batch-1 pass: final hidden states (N, d) (at least fp32), log p_model(target) (N,) fp64, targets (N,).

    Exactly what :func:`micronet.evaluate.evaluate_stream` computes, kept instead of summed.
    """
    was_training = model.training
    model.eval()
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_pred = len(data) - 1
    hs, lps, mem = [], [], None
    with bar(n_pred, "hidden states", "tok") as pbar:
        for start in range(0, n_pred, chunk_len):
            end = min(start + chunk_len, n_pred)
            x = data[start:end].to(device)[None]  # (1, T)
            y = data[start + 1 : end + 1].to(device)[None]  # (1, T)
            h, mem = model(x, mem)
            mem = mem.detach()
            hs.append((h[0] if h.dtype == torch.float64 else h[0].float()).cpu())
            lps.append(model.target_log_probs(h, y)[0].double().cpu())
            pbar.update(end - start)
    model.train(was_training)
    return torch.cat(hs), torch.cat(lps), data[1:]


class CacheObjective:
    """Perplexity of the cache mixture on a fixed stream, as a function of (lambda, theta).

    h: (N, d) hidden states, target: (N,), lp_model: (N,) log p_model(target); position p's
    cache holds the previous ``n_cache`` (h_i, target_i) of the stream, as in evaluation.

    Everything theta-independent is computed once: the *band* of dot products
    ``band[p, j] = h_p . h_{p - n + j}`` (N, n) (-inf before the stream's start), kept in memory
    when it fits in ``max_band_gb`` (else recomputed per theta, block by block), and the sparse
    list of (p, j) whose value equals p's target with their dot products. A new theta then costs
    one exp-and-sum pass over the band plus one over the matches; a new lambda with a known theta
    costs one elementwise mixture.
    """

    def __init__(self, h: torch.Tensor, target: torch.Tensor, lp_model: torch.Tensor, n_cache: int,
                 query_block: int = 1024, max_band_gb: float = 6.0):
        self.h, self.target, self.lp_model = h, target, lp_model.double()
        self.n_cache, self.query_block = n_cache, query_block
        self.evals = self.theta_evals = 0  # candidates scored; thetas computed (the costly ones)
        self._memo: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        N, n = len(target), n_cache
        keep = N * n * h.element_size() <= max_band_gb * 2**30
        self.band = h.new_empty(N, n) if keep else None  # (N, n), filled block by block (no second copy)
        match_p, match_dot = [], []
        padded = torch.cat([target.new_full((n,), -1), target])  # (n + N,): -1 matches nothing
        for a, band in self._bands():
            vals = padded.unfold(0, n, 1)[a : a + len(band)]  # (bq, n): value of each band entry
            p, j = (vals == target[a : a + len(band), None]).nonzero(as_tuple=True)
            match_p.append(p + a)
            match_dot.append(band[p, j])
            if keep:
                self.band[a : a + len(band)] = band
        self.match_p, self.match_dot = torch.cat(match_p), torch.cat(match_dot)  # (M,), (M,)
        self.has_match = torch.zeros(N, dtype=torch.bool).index_fill_(0, self.match_p, True)
        self.has_entries = torch.arange(N) > 0

    def _bands(self):
        """Yield (a, rows [a, a + bq) of the band), centred: ``band[p, j] = h_p . h_{p - n + j} - max_j``.

        Centring by the row maximum m_p is theta-free (max_j theta x = theta max_j x for theta > 0)
        and cancels in p_cache = sum_match exp(theta band) / sum_all exp(theta band), so a new
        theta needs no max pass and exp never overflows. Entries before the stream start are -inf.
        """
        n, N = self.n_cache, len(self.target)
        hp = torch.cat([self.h.new_zeros(n, self.h.shape[1]), self.h])  # (n + N, d): key p - n + j is row p + j
        for a in range(0, N, self.query_block):
            b = min(a + self.query_block, N)
            band = band_dots(self.h[a:b], hp[a:], n).contiguous()  # (bq, n)
            if a < n:  # keys before the stream's start
                p = torch.arange(a, b)[:, None]
                band.masked_fill_(p - n + torch.arange(n)[None] < 0, -math.inf)
            top = band.amax(dim=1, keepdim=True)  # (bq, 1); -inf only for p = 0 (no entries)
            yield a, band.sub_(torch.where(torch.isfinite(top), top, 0.0))

    def cache_log_probs(self, theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p_cache(target), has_match, has_entries), each (N,); the last few thetas are memoised."""
        if theta not in self._memo:
            self.theta_evals += 1
            z_all = torch.empty(len(self.target), dtype=self.h.dtype)  # sum_j exp(theta band[p, j])
            bands = ((a, self.band[a : a + self.query_block]) for a in range(0, len(self.target), self.query_block)) \
                if self.band is not None else self._bands()
            buf = None
            for a, band in bands:
                buf = torch.mul(band, theta, out=buf if buf is not None and buf.shape == band.shape else None)
                z_all[a : a + len(band)] = buf.exp_().sum(dim=1)  # in place: one buffer, no temporaries
            z_match = torch.zeros_like(z_all).index_add_(0, self.match_p, torch.exp(self.match_dot * theta))
            lpc = torch.where(self.has_match, torch.log(z_match) - torch.log(z_all), 0.0)
            if len(self._memo) >= 8:
                self._memo.pop(next(iter(self._memo)))
            self._memo[theta] = (lpc, self.has_match, self.has_entries)
        return self._memo[theta]

    def __call__(self, lam: float, theta: float) -> float:
        """Perplexity with the cache at (lambda, theta); inf outside 0 < lambda < 1, theta > 0."""
        if not (0.0 < lam < 1.0 and theta > 0.0):
            return math.inf
        self.evals += 1
        lpc, has_match, has_entries = self.cache_log_probs(theta)
        mixed = mix_log_probs(self.lp_model, lpc.double(), has_match, has_entries, math.log(lam), math.log1p(-lam))
        return math.exp(-mixed.mean().item())


@dataclass
class SearchResult:
    """Where :func:`coordinate_search` stopped: the best point, its objective and the calls made."""

    lam: float
    theta: float
    value: float
    evals: int


def coordinate_search(objective: Callable[[float, float], float], lam: float, theta: float, tol: float = 0.005,
                      max_evals: int = 1000,
                      on_eval: Callable[[float, float, float], None] | None = None) -> SearchResult:
    """Minimise ``objective(lambda, theta)`` by the original's alternating local search.

    Steps start at value/20. Per coordinate: try value +- step; if the better one improves, move
    there and grow the step x1.2, else halve it. Lambda then theta, until both step/value < tol.
    """
    x, evals = [lam, theta], 0

    def f(p: list[float]) -> float:
        nonlocal evals
        evals += 1
        v = objective(p[0], p[1])
        if on_eval is not None:
            on_eval(p[0], p[1], v)
        return v

    best = f(x)
    step = [lam / 20, theta / 20]
    while any(s / max(abs(v), 1e-300) >= tol for s, v in zip(step, x)) and evals < max_evals:
        for i in (0, 1):
            cands = [x[:i] + [x[i] + sign * step[i]] + x[i + 1 :] for sign in (1, -1)]
            vals = [f(c) for c in cands]
            j = int(np.argmin(vals))
            if vals[j] < best:
                x, best = cands[j], vals[j]
                step[i] *= 1.2
            else:
                step[i] *= 0.5
    return SearchResult(x[0], x[1], best, evals)


def run(cfg: DictConfig) -> dict:
    """Search (lambda, theta) for ``n_cache`` on a run's checkpoint; writes and returns the result."""
    scfg = typed(CacheSearchConfig, cfg, "cache_search")
    rd = RunDir(scfg.name).require()  # read-only but for one atomic write: no guard, like evaluate
    setup_logging(rd.log_path("cache_search"))
    device = pick_device(scfg.device)
    model, ckpt = load_model(rd, scfg.step, device)
    step = int(ckpt["step"])
    corpus = load_corpus(typed(DataConfig, ckpt["data_config"], "data"))
    if corpus.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"data vocab {corpus.vocab_size} != model vocab {model.cfg.vocab_size}")
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
