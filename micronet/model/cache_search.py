"""Cache local search: tune the evaluation cache's (lambda, theta) on validation perplexity.

The network runs once over the validation split (batch 1, online, memory carried) to get the
final hidden states and log p_model(target) (:func:`hidden_states`); every candidate (lambda, theta)
is then scored from those alone (:class:`CacheObjective`). p_cache(target) depends on theta only, so
it is memoised per theta and a lambda move costs one elementwise mixture. The search (spec section 3)
is :func:`coordinate_search`; the stage :mod:`micronet.cache_search` writes the result to
``results/<name>/cache_step<S>_n<N>.yaml``, which evaluation then loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from micronet.model.cache import band_dots, mix_log_probs
from micronet.model.transformer import TransformerLM
from micronet.runs.progress import bar

@torch.no_grad()
def hidden_states(model: TransformerLM, tokens: np.ndarray, chunk_len: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One online batch-1 pass: final hidden states (N, d) (at least fp32), log p_model(target) (N,) fp64, targets (N,).

    Exactly what :func:`micronet.model.evaluation.evaluate_stream` computes, kept instead of summed.
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
