"""Neural cache (Grave et al. 2017) on top of the language model's log-probabilities.

Keys are final hidden states ``h_i``, values the next token ``y_i``. Query ``t`` attends to the
previous ``n_cache`` entries of its own sequence (never itself):

    p_cache(w | t) = sum_{i in window(t), y_i = w} softmax_i(theta * h_t . h_i)
    p(w | t)       = lambda * p_cache(w | t) + (1 - lambda) * p_model(w | t)

Only log p(target) is ever needed, so nothing of size (T, vocab) is built: scores are computed
per block of queries against the keys of their band, and p_cache(target) sums the softmax over
the entries whose value equals the target. The mixture is done in log space; a position with
an empty window keeps p_model.

* :class:`TrainCache` is a module attached to the model (``model.cache``) so its two parameters
  (theta = softplus(.), lambda = sigmoid(.)) are in the state_dict and the optimizer.
* :class:`EvalCache` is the batch-1 online cache of evaluation: it carries the last ``n_cache``
  (h, next token) pairs from chunk to chunk and is reset at the start of each split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from micronet.runs.config import MicronetError
from micronet.runs.results import RunDir, atomic_write_text

DEFAULT_LAMBDA = 0.1  # evaluation default when neither a search result nor a learned value exists
DEFAULT_THETA = 0.016
_BLOCK_ELEMS = 1 << 22  # scores per block (B * queries * keys): bounds the peak memory


@dataclass
class CacheConfig:
    """The training cache (conf group ``cache/``); ``n_cache: 0`` disables it."""

    n_cache: int = 0
    learnable: bool = True  # false: lambda and theta stay at the values below
    lam: float = 0.07  # initial (or fixed) mixture weight lambda
    theta: float = 0.016  # initial (or fixed) inverse temperature

    @property
    def enabled(self) -> bool:
        return self.n_cache > 0

    def validate(self) -> None:
        if self.n_cache < 0:
            raise ValueError(f"cache.n_cache must be >= 0, got {self.n_cache}")
        if not 0.0 < self.lam < 1.0 or self.theta <= 0.0:
            raise ValueError(f"cache.lam must be in (0, 1) and cache.theta > 0, got {self.lam}, {self.theta}")


def cache_log_probs(q: torch.Tensor, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    theta: torch.Tensor | float, n_cache: int,
                    block_elems: int = _BLOCK_ELEMS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_cache(target) for every query, each seeing only the previous ``n_cache`` keys of its row.

    q: (B, Tq, d) queries with targets (B, Tq); keys (B, Tk, d) with values (B, Tk), Tk >= Tq.
    The queries are the last Tq positions of the keys' timeline: query j sits at key position
    ``Tk - Tq + j`` and sees keys ``[pos - n_cache, pos - 1]`` (clipped at 0) of the same row b.
    Returns ``(lpc, has_match, has_entries)``, each (B, Tq); ``lpc`` is 0 where there is no
    matching entry (callers select with ``has_match``), so no inf/nan reaches the gradient.
    """
    B, Tq, _ = q.shape
    Tk = keys.shape[1]
    offset = Tk - Tq
    lpc = q.new_zeros(B, Tq)
    has_match = torch.zeros(B, Tq, dtype=torch.bool, device=q.device)
    has_entries = torch.zeros(B, Tq, dtype=torch.bool, device=q.device)
    fill = torch.finfo(q.dtype).min  # finite: a fully masked row gives finite (unused) values
    # Queries per block: each block scores bq x (bq + n_cache) pairs of which bq x n_cache are in the
    # band, so bq ~ n_cache / 4 wastes little; at least 64 to keep the per-block overhead small.
    bq = max(1, min(Tq, max(64, n_cache // 4), block_elems // (B * min(Tk, n_cache + 64))))
    outs = []
    for a in range(0, Tq, bq):
        b = min(a + bq, Tq)
        p0, p1 = offset + a, offset + b  # key positions of the block's queries
        k0, k1 = max(0, p0 - n_cache), p1 - 1  # keys any query of the block may see
        if k1 <= k0:
            outs.append((lpc[:, a:b], has_match[:, a:b], has_entries[:, a:b]))
            continue
        pos = torch.arange(p0, p1, device=q.device)[:, None]  # (bq, 1)
        kpos = torch.arange(k0, k1, device=q.device)[None, :]  # (1, bk)
        visible = (kpos < pos) & (kpos >= pos - n_cache)  # (bq, bk)
        scores = theta * torch.matmul(q[:, a:b], keys[:, k0:k1].transpose(1, 2))  # (B, bq, bk)
        match = visible & (values[:, None, k0:k1] == target[:, a:b, None])  # (B, bq, bk)
        lse_all = torch.logsumexp(scores.masked_fill(~visible, fill), dim=-1)  # (B, bq)
        lse_match = torch.logsumexp(scores.masked_fill(~match, fill), dim=-1)  # (B, bq)
        m = match.any(-1)
        outs.append((torch.where(m, lse_match - lse_all, 0.0), m, visible.any(-1).expand(B, -1)))
    lpc, has_match, has_entries = (torch.cat(t, dim=1) for t in zip(*outs))
    return lpc, has_match, has_entries


def mix_log_probs(lp_model: torch.Tensor, lpc: torch.Tensor, has_match: torch.Tensor,
                  has_entries: torch.Tensor, log_lam: torch.Tensor | float,
                  log_1m_lam: torch.Tensor | float) -> torch.Tensor:
    """log(lambda p_cache + (1 - lambda) p_model), elementwise; p_model alone where the window is empty."""
    model_part = log_1m_lam + lp_model
    cached = torch.where(has_match, torch.logaddexp(log_lam + lpc, model_part), model_part)
    return torch.where(has_entries, cached, lp_model)


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class TrainCache(nn.Module):
    """The training cache: within each sequence of a chunk, window = its earlier positions.

    Training chunks start without memory, so with chunk_len <= n_cache (1152 vs 2000 in the
    original) every position sees all earlier positions of its own row, never another row's.
    Keys are not detached: the loss trains the hidden states as keys as well as queries.
    """

    def __init__(self, cfg: CacheConfig):
        super().__init__()
        self.n_cache = cfg.n_cache
        theta = torch.tensor(_inv_softplus(cfg.theta))
        lam = torch.tensor(math.log(cfg.lam / (1.0 - cfg.lam)))  # logit
        if cfg.learnable:
            self.theta_param, self.lambda_param = nn.Parameter(theta), nn.Parameter(lam)
        else:  # buffers: saved with the model, invisible to the optimizer
            self.register_buffer("theta_param", theta)
            self.register_buffer("lambda_param", lam)

    @property
    def theta(self) -> torch.Tensor:
        return F.softplus(self.theta_param)

    @property
    def lam(self) -> torch.Tensor:
        return torch.sigmoid(self.lambda_param)

    def values(self) -> tuple[float, float]:
        """Current (lambda, theta) as plain floats."""
        with torch.no_grad():
            return float(self.lam), float(self.theta)

    def forward(self, h: torch.Tensor, target: torch.Tensor, lp_model: torch.Tensor) -> torch.Tensor:
        """h: (B, T, d), target (B, T), lp_model = log p_model(target) (B, T) -> mixed log p (B, T)."""
        # The cache works in at least fp32 (autocast off) whatever the model's precision.
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(h.device.type, enabled=False):
            h = h.to(dtype)
            lpc, has_match, has_entries = cache_log_probs(h, target, h, target, self.theta.to(dtype), self.n_cache)
            p = self.lambda_param.to(dtype)
            return mix_log_probs(lp_model.to(dtype), lpc, has_match, has_entries, F.logsigmoid(p), F.logsigmoid(-p))


def attach_cache(model: nn.Module, cfg: CacheConfig) -> TrainCache | None:
    """Add ``model.cache`` (so its parameters join the state_dict and the optimizer) if enabled."""
    if not cfg.enabled:
        return None
    cache = TrainCache(cfg)
    p = next(model.parameters())
    model.add_module("cache", cache.to(device=p.device, dtype=p.dtype))
    return cache


def model_cache(model: nn.Module) -> TrainCache | None:
    """The training cache attached to ``model``, if any."""
    cache = getattr(model, "cache", None)
    return cache if isinstance(cache, TrainCache) else None


def checkpoint_cache_config(ckpt: dict) -> CacheConfig:
    """The training cache a checkpoint was made with (disabled for checkpoints without one)."""
    return CacheConfig(**ckpt.get("cache_config") or {})


def band_dots(q: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """``band[i, j] = q_i . keys[i + j]`` for j < n: (Tq, d), (>= Tq + n - 1, d) -> (Tq, n), a strided view.

    With keys laid out so that query i's window is ``keys[i : i + n]`` (its n predecessors), the
    window of every query is one row of the band: no mask, no scores outside the window except
    the (Tq, Tq - 1) triangle of the one matmul.
    """
    s = q @ keys[: len(q) + n - 1].T  # (Tq, Tq + n - 1)
    return s.as_strided((len(q), n), (s.shape[1] + 1, 1))  # row i starts at column i


class EvalCache:
    """Batch-1 online evaluation cache: keys persist across chunks, :meth:`reset` per split.

    Keys and values live in a left-padded window of exactly ``n_cache`` slots, the last
    ``n_valid`` of them real, so each chunk's queries see ``window + chunk`` as a band. The window
    and the chunk share one buffer of ``n_cache + T`` rows (two, used in turn), and the scores of a
    block one flat buffer: after the first chunk no call allocates anything of the band's size.
    """

    def __init__(self, n_cache: int, lam: float, theta: float, query_block: int | None = None):
        if n_cache < 1 or not 0.0 <= lam < 1.0 or theta <= 0.0:
            raise ValueError(f"eval cache needs n_cache >= 1, 0 <= lambda < 1, theta > 0; "
                             f"got {n_cache}, {lam}, {theta}")
        self.n_cache, self.lam, self.theta = n_cache, lam, theta
        # queries per block: bq x (bq + n) scores for bq x n useful ones; n / 4 wastes little
        self.query_block = query_block or max(64, n_cache // 4)
        self._bufs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys (n + T, d), values (n + T,) int32)
        self._scores: torch.Tensor | None = None  # flat, >= bq * (bq + n - 1)
        self._match: torch.Tensor | None = None  # flat bool, >= bq * n
        self.n_valid = 0

    def params(self) -> dict:
        return {"n_cache": self.n_cache, "lambda": self.lam, "theta": self.theta}

    def reset(self) -> None:
        """Forget every entry (start of a split)."""
        self._bufs = []
        self.n_valid = 0

    @property
    def keys(self) -> torch.Tensor | None:
        """The window's keys (n_cache, d), left-padded; None before the first chunk."""
        return self._bufs[0][0][: self.n_cache] if self._bufs else None

    @property
    def values(self) -> torch.Tensor | None:
        """The window's values (n_cache,), -1 in empty slots."""
        return self._bufs[0][1][: self.n_cache] if self._bufs else None

    def _window(self, T: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of >= n + T rows with the window in the first n; the spare one becomes the next."""
        n, d = self.n_cache, q.shape[1]
        if not self._bufs:
            keys = q.new_zeros(n + T, d)
            self._bufs = [(keys, torch.full((n + T,), -1, dtype=torch.int32, device=q.device))]
        keys, values = self._bufs[0]
        if keys.shape[0] < n + T or keys.dtype != q.dtype:  # a longer chunk: grow (rare: chunks are equal)
            grown = (q.new_zeros(n + T, d), values.new_full((n + T,), -1))
            grown[0][:n], grown[1][:n] = keys[:n], values[:n]
            self._bufs = [grown]
        if len(self._bufs) == 1:
            self._bufs.append((torch.empty_like(self._bufs[0][0]), torch.empty_like(self._bufs[0][1])))
        return self._bufs[0]

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, target: torch.Tensor, lp_model: torch.Tensor) -> torch.Tensor:
        """One chunk: h (1, T, d), target (1, T), lp_model (1, T) -> mixed log p (1, T); stores the chunk."""
        n = self.n_cache
        q, y = (h[0] if h.dtype == torch.float64 else h[0].float()), target[0]  # (T, d), (T,)
        T = len(y)
        buf_k, buf_v = self._window(T, q)
        keys, values = buf_k[: n + T], buf_v[: n + T]  # query t's window is keys[t : t + n]
        keys[n:].copy_(q)
        values[n:].copy_(y)
        qs = q * self.theta  # theta on the T queries, not on the T x n scores
        bq_max = min(self.query_block, T)
        if self._scores is None or self._scores.numel() < bq_max * (bq_max + n - 1) or self._scores.dtype != q.dtype:
            self._scores = q.new_empty(bq_max * (bq_max + n - 1))
            self._match = torch.empty(bq_max * n, dtype=torch.bool, device=q.device)
        empty = n - self.n_valid  # slots [0, empty) of the window hold no entry
        z_all, z_match = q.new_empty(T), q.new_empty(T)
        for a in range(0, T, self.query_block):
            b = min(a + self.query_block, T)
            m, W = b - a, b - a + n - 1
            full = torch.mm(qs[a:b], keys[a : a + W].T, out=self._scores[: m * W].view(m, W))  # (m, W)
            s = full.as_strided((m, n), (W + 1, 1))  # (m, n) band: row i = query a + i's window, a view
            if a < empty:
                slot = torch.arange(a, b, device=q.device)[:, None] + torch.arange(n, device=q.device)[None]
                s.masked_fill_(slot < empty, -math.inf)
            # Centre by the row max (no overflow, the max term is exactly 1) and sum, in place in the band.
            top = s.amax(dim=1, keepdim=True)  # (m, 1); -inf only for a split's first query
            s.sub_(torch.where(torch.isfinite(top), top, 0.0)).exp_()
            z_all[a:b] = s.sum(dim=1)
            match = torch.eq(values.unfold(0, n, 1)[a:b], values[n + a : n + b, None],
                             out=self._match[: m * n].view(m, n))  # (m, n) entries whose value is the target
            z_match[a:b] = s.mul_(match).sum(dim=1)
        has_entries, has_match = z_all > 0, z_match > 0
        lpc = torch.where(has_match, torch.log(z_match) - torch.log(z_all), 0.0)
        out = mix_log_probs(lp_model[0].to(q.dtype), lpc, has_match, has_entries,
                            math.log(self.lam) if self.lam > 0 else -math.inf, math.log1p(-self.lam))
        nxt_k, nxt_v = self._bufs[1]  # the last n entries become the next chunk's window
        nxt_k[:n].copy_(keys[-n:])
        nxt_v[:n].copy_(values[-n:])
        self._bufs.reverse()
        self.n_valid = min(n, self.n_valid + T)
        return out[None]  # (1, T)


def write_cache_params(path: Path, n_cache: int, lam: float, theta: float, **extra: object) -> None:
    """Write a ``cache_step<S>_n<N>.yaml`` (the search result evaluation loads)."""
    body = {"n_cache": int(n_cache), "lambda": float(lam), "theta": float(theta), **extra}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(body)))


def read_cache_params(path: Path) -> tuple[float, float]:
    """(lambda, theta) of a ``cache_step<S>_n<N>.yaml``."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
        return float(raw["lambda"]), float(raw["theta"])
    except Exception as e:  # unreadable or missing keys: say which file
        raise MicronetError(f"{path} is not a valid cache parameter file: {e}") from None


def eval_cache_for(run: RunDir, step: int, n_cache: int, model: nn.Module) -> tuple[EvalCache | None, dict]:
    """The evaluation cache of size ``n_cache`` for checkpoint ``step`` and where its values came from.

    (lambda, theta) come from ``results/<name>/cache_step<S>_n<N>.yaml`` if it exists, else from
    the checkpoint's learned training cache, else the defaults (0.1, 0.016). ``n_cache = 0``
    returns ``(None, {"n_cache": 0})``.
    """
    if n_cache == 0:
        return None, {"n_cache": 0}
    path = run.cache_params_path(step, n_cache)
    trained = model_cache(model)
    if path.exists():
        (lam, theta), source = read_cache_params(path), path.name
    elif trained is not None:
        (lam, theta), source = trained.values(), "checkpoint"
    else:
        lam, theta, source = DEFAULT_LAMBDA, DEFAULT_THETA, "default"
    cache = EvalCache(n_cache, lam, theta)
    return cache, {**cache.params(), "source": source}

