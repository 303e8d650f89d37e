"""Adaptive input embeddings and a tied adaptive softmax (Baevski & Auli 2019; Grave et al. 2017).

The vocabulary (sorted by frequency) is cut into bins ``[0, c_1), [c_1, c_2), ...``.
Bin ``i`` has its own embedding width ``bin_dims[i]``; rarer words get narrower vectors.

* Input: ``embed(w) = proj_i(table_i[w - start_i])`` (``proj_0`` is the identity when
  ``bin_dims[0] == d_model``), scaled by ``sqrt(d_model)`` inside the model.
* Output: the head scores the words of bin 0 plus one "cluster" logit per tail bin;
  tail ``i`` scores its words from ``out_proj_i(h)``. Word weights are *tied* to the
  input tables, every word has its own bias, projections are not tied.

All functions return natural-log probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from micronet.model.linear_softmax import target_log_prob


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in at least fp32: half-precision logits lose too much in the normaliser."""
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def bin_edges(vocab_size: int, cutoffs: list[int]) -> list[int]:
    """``[0, c_1, ..., vocab_size]`` after validating the cutoffs."""
    edges = [0, *cutoffs, vocab_size]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"cutoffs must be strictly increasing and below vocab_size={vocab_size}: {cutoffs}")
    return edges


class AdaptiveEmbedding(nn.Module):
    """Adaptive input: one table per frequency bin, projected up to ``d_model``."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: list[int], bin_dims: list[int]):
        super().__init__()
        self.edges = bin_edges(vocab_size, cutoffs)
        if len(bin_dims) != len(self.edges) - 1:
            raise ValueError(f"need one dim per bin: {len(self.edges) - 1} bins, bin_dims={bin_dims}")
        self.d_model = d_model
        self.tables = nn.ModuleList(
            nn.Embedding(hi - lo, d) for lo, hi, d in zip(self.edges, self.edges[1:], bin_dims)
        )
        self.projs = nn.ModuleList(
            nn.Identity() if d == d_model else nn.Linear(d, d_model, bias=False) for d in bin_dims
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, d_model), unscaled."""
        flat = idx.reshape(-1)  # (N,)
        out = torch.empty(flat.numel(), self.d_model, dtype=self.tables[0].weight.dtype, device=idx.device)
        for i, (lo, hi) in enumerate(zip(self.edges, self.edges[1:])):
            rows = ((flat >= lo) & (flat < hi)).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] = self.projs[i](self.tables[i](flat[rows] - lo)).to(out.dtype)
        return out.view(*idx.shape, self.d_model)  # (B, T, d_model)


class AdaptiveLogSoftmax(nn.Module):
    """Tied adaptive softmax over ``embedding``'s tables; returns log-probabilities."""

    def __init__(self, embedding: AdaptiveEmbedding):
        super().__init__()
        self.edges = embedding.edges
        self.n_bins = len(self.edges) - 1
        d_model = embedding.d_model
        # The tables are shared, not copied: this module holds no word weights of its own
        # (a plain list keeps the embedding out of this module's parameters and state_dict).
        self._embedding = [embedding]
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(hi - lo)) for lo, hi in zip(self.edges, self.edges[1:])
        )
        self.cluster = nn.Linear(d_model, self.n_bins - 1) if self.n_bins > 1 else None
        self.projs = nn.ModuleList(
            nn.Identity() if t.embedding_dim == d_model else nn.Linear(d_model, t.embedding_dim, bias=False)
            for t in embedding.tables
        )

    def table(self, i: int) -> torch.Tensor:
        """Word weights of bin ``i`` (the tied input table), shape (|bin_i|, d_i)."""
        return self._embedding[0].tables[i].weight

    def head_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d_model) -> (N, |bin_0| + n_bins - 1): head words then one entry per tail cluster."""
        logits = F.linear(self.projs[0](h), self.table(0), self.biases[0])
        if self.cluster is not None:
            logits = torch.cat([logits, self.cluster(h)], dim=-1)
        return _log_softmax(logits)

    def tail_log_probs(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """(N, d_model) -> (N, |bin_i|): log p(word | cluster i), for tail bin ``i >= 1``."""
        logits = F.linear(self.projs[i](h), self.table(i), self.biases[i])
        return _log_softmax(logits)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Full distribution: (N, d_model) -> (N, vocab_size) log-probabilities."""
        return full_log_probs(self, h)

    def target_log_probs(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target) for each row, computing each tail only for the rows that need it.

        h: (N, d_model), target: (N,) -> (N,) float32 (float64 for float64 inputs); target (N, k) -> (N, k),
        k words per row (distillation's top-k). Every target needs one head column (its word, or its
        tail's cluster), so no (N x words) log-probabilities are stored: see :mod:`micronet.model.linear_softmax`.
        """
        n_head = self.edges[1]
        inner = torch.tensor(self.edges[1:-1], device=target.device)
        bins = torch.bucketize(target, inner, right=True)  # (N,) or (N, k): 0 = head, i = tail bin i
        head_col = torch.where(bins == 0, target, n_head + bins - 1)  # word or cluster column
        weight, bias = self.table(0), self.biases[0]
        if isinstance(self.projs[0], nn.Linear):  # (h P^T) T^T = h (T P)^T
            weight = weight @ self.projs[0].weight
        if self.cluster is not None:
            weight = torch.cat([weight, self.cluster.weight.to(weight.dtype)])  # (n_head + n_bins - 1, d_model)
            bias = torch.cat([bias, self.cluster.bias.to(bias.dtype)])
        out = target_log_prob(h, weight, bias, head_col)
        for i in range(1, self.n_bins):
            in_bin = bins == i
            rows = (in_bin if in_bin.dim() == 1 else in_bin.any(1)).nonzero(as_tuple=True)[0]  # rows that need tail i
            if rows.numel() == 0:
                continue
            # targets of other bins are clamped into range, then their log p(word | cluster i) is dropped
            local = (target[rows] - self.edges[i]).clamp(0, self.edges[i + 1] - self.edges[i] - 1)
            tail = target_log_prob(self.projs[i](h[rows]), self.table(i), self.biases[i], local)
            out = out.index_add(0, rows, torch.where(in_bin[rows], tail.to(out.dtype), 0.0))
        return out

    def bin_inputs(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """The vectors that bin ``i``'s word weights are dotted with (used by Hebbian softmax)."""
        return self.projs[i](h)


def full_log_probs(sm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(N, d_model) -> (N, vocab_size): head words, then each tail's words + its cluster's log-prob.

    ``sm`` is any adaptive softmax with ``edges``, ``n_bins``, ``head_log_probs`` and ``tail_log_probs``
    (this module's, or the inference copy in :mod:`micronet.compress.fast_infer`).
    """
    head = sm.head_log_probs(h)
    n_head = sm.edges[1]
    parts = [head[:, :n_head]]
    for i in range(1, sm.n_bins):
        parts.append(sm.tail_log_probs(h, i) + head[:, n_head + i - 1 : n_head + i])
    return torch.cat(parts, dim=-1)


def init_adaptive(embedding: AdaptiveEmbedding, softmax: AdaptiveLogSoftmax, std: float = 0.02) -> None:
    """Initialise tables N(0, std), projections N(0, 1/fan_in), biases 0."""
    for table in embedding.tables:
        # Small tables: the tied output logit of a token's own word starts near std**2 * d * sqrt(d)
        # instead of sqrt(d) (N(0, 1/d) tables make it 16 at d=256 and the first loss ~18 nats).
        nn.init.normal_(table.weight, std=std)
    for proj in [*embedding.projs, *softmax.projs]:
        if isinstance(proj, nn.Linear):
            nn.init.normal_(proj.weight, std=1.0 / math.sqrt(proj.in_features))
    for b in softmax.biases:
        nn.init.zeros_(b)
    if softmax.cluster is not None:
        nn.init.normal_(softmax.cluster.weight, std=std)
        nn.init.zeros_(softmax.cluster.bias)
