"""Training batches: chunks of a token array at random starts."""

from __future__ import annotations

import numpy as np
import torch

from micronet.runs.config import ConfigError


def sample_batch(data: np.ndarray, batch_size: int, chunk_len: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``batch_size`` chunks at random starts: inputs and next-token targets, each (B, chunk_len),
    and the start offsets (B,) (target ``y[b, t]`` is token ``starts[b] + 1 + t`` of the split)."""
    check_chunk_len(data, chunk_len)
    starts = rng.integers(0, len(data) - chunk_len - 1, size=batch_size)
    rows = np.stack([data[s : s + chunk_len + 1] for s in starts]).astype(np.int64)  # (B, chunk_len + 1)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:], starts


def check_chunk_len(data: np.ndarray, chunk_len: int) -> None:
    """A :class:`ConfigError` unless the train split holds more than ``chunk_len + 1`` tokens."""
    if len(data) <= chunk_len + 1:
        raise ConfigError(f"train split has {len(data)} tokens, fewer than chunk_len + 1 = {chunk_len + 1}")
