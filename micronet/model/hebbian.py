"""Hebbian softmax (Rae et al. 2018): pull the output rows of seen words towards their activations.

After each optimizer step, for every word ``w`` that was a target in the step:

    c_w     += k_w                        (k_w = its occurrences in the step, all ranks)
    h_w      = mean of its bin input vectors, each rescaled to the norm of the current row W_w
    lambda_w = max(1 / c_w, gamma) if c_w < T else 0
    W_w     <- (1 - lambda_w) W_w + lambda_w h_w

The count is incremented *before* lambda is computed (as in the paper's algorithm): a word's
first step gets lambda = 1, so its row becomes its (rescaled) activation at once, which is what
makes rare words learn in one shot. The rows live in the tied adaptive tables, so the update
changes the input embeddings too. The vectors of bin ``i`` are what its rows are dotted with:
``h`` itself for the head, ``softmax.bin_inputs(h, i)`` (the tail projection) for tail bins.

Under DDP (``torch.distributed`` initialised, world size > 1) the per-word sums and counts are
all-reduced, so every rank applies the same update to the same (synchronised) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from micronet.model.adaptive import AdaptiveLogSoftmax


@dataclass
class HebbianConfig:
    """``hebbian:`` in train.yaml."""

    enabled: bool = False
    T: int = 500  # a word seen this many times is left to the optimizer
    gamma: float = 0.01  # floor of the mixing rate while c_w < T

    def validate(self) -> None:
        if self.T < 1 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"hebbian.T must be >= 1 and hebbian.gamma in [0, 1], got {self.T}, {self.gamma}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HebbianSoftmax:
    """Applies the Hebbian update to ``softmax``'s tied rows and keeps the per-word counts."""

    def __init__(self, softmax: AdaptiveLogSoftmax, cfg: HebbianConfig):
        self.softmax, self.cfg = softmax, cfg
        self.counts = torch.zeros(softmax.edges[-1], dtype=torch.int64, device=softmax.table(0).device)

    def state_dict(self) -> dict:
        """For checkpoints: the counts (the rows themselves are in the model's state_dict)."""
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        counts = state["counts"]
        if counts.shape != self.counts.shape:
            raise ValueError(f"hebbian counts for {counts.numel()} words, model has {self.counts.numel()}")
        self.counts.copy_(counts)

    @torch.no_grad()
    def update(self, h: torch.Tensor, target: torch.Tensor) -> None:
        """One step's update from its (detached) final hidden states h (..., d_model) and targets (...)."""
        h = h.detach().reshape(-1, h.shape[-1])  # (N, d_model)
        target = target.reshape(-1).to(self.counts.device)  # (N,)
        edges = self.softmax.edges
        stats = []
        for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
            table = self.softmax.table(i)  # (|bin_i|, d_i), the tied weights themselves
            rows = ((target >= lo) & (target < hi)).nonzero(as_tuple=True)[0]
            w = target[rows] - lo  # (n_i,) rows of this bin
            dt = torch.float64 if table.dtype == torch.float64 else torch.float32
            x = self.softmax.bin_inputs(h[rows].to(table.dtype), i).to(dt)  # (n_i, d_i)
            # Rescale each vector to the norm of its word's current row.
            scale = table[w].to(dt).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)  # (n_i,)
            sums = torch.zeros(hi - lo, table.shape[1], dtype=dt, device=table.device)
            sums.index_add_(0, w, x * scale[:, None])  # (|bin_i|, d_i) per-word sums
            k = torch.bincount(w, minlength=hi - lo)  # (|bin_i|,) occurrences in this step
            stats.append((sums, k))
        if _distributed():  # every rank then applies the same update
            for sums, k in stats:
                dist.all_reduce(sums)
                dist.all_reduce(k)
        for i, (sums, k) in enumerate(stats):
            self._apply(i, sums, k)

    def _apply(self, i: int, sums: torch.Tensor, k: torch.Tensor) -> None:
        lo = self.softmax.edges[i]
        seen = k.nonzero(as_tuple=True)[0]  # (U,) bin rows that were targets
        if seen.numel() == 0:
            return
        c = self.counts[lo + seen] + k[seen]  # incremented first: see the module docstring
        self.counts[lo + seen] = c
        lam = torch.clamp(1.0 / c.double(), min=self.cfg.gamma)
        lam = torch.where(c < self.cfg.T, lam, 0.0)[:, None]  # (U, 1)
        table = self.softmax.table(i)
        mean = sums[seen].double() / k[seen, None].double()  # (U, d_i)
        old = table[seen].double()
        table[seen] = ((1.0 - lam) * old + lam * mean).to(table.dtype)
