"""Online evaluation of a language model over a token stream: batch 1, memory carried across chunks.

Used by the evaluate stage, the trainer's periodic validation and the sensitivity analysis.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn.utils import parametrize

from micronet.model.cache import EvalCache
from micronet.model.transformer import TransformerLM
from micronet.runs.progress import bar


@torch.no_grad()
def evaluate_stream(model: TransformerLM, tokens: np.ndarray, chunk_len: int = 4032,
                    device: torch.device | str = "cpu", desc: str = "eval",
                    cache: EvalCache | None = None) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens over ``tokens``, batch 1, online.

    Token t is predicted from tokens < t only; keys/values of the last ``n_seq`` positions are
    carried (detached) from chunk to chunk, exactly as in token-by-token evaluation. With
    ``cache``, its entries persist across chunks too; it is reset here (one call = one split).
    """
    was_training = model.training
    model.eval()
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_pred = len(data) - 1
    total, mem, start = 0.0, None, 0
    if cache is not None:
        cache.reset()
    t0 = time.perf_counter()
    # cached(): parametrized weights (pruning masks, fake quantization) are computed once, not per use
    with bar(n_pred, desc, "tok") as pbar, parametrize.cached():
        while start < n_pred:
            end = min(start + chunk_len, n_pred)
            x = data[start:end].to(device)[None]  # (1, T)
            y = data[start + 1 : end + 1].to(device)[None]  # (1, T)
            h, mem = model(x, mem)
            mem = mem.detach()
            lp = model.target_log_probs(h, y)  # (1, T)
            if cache is not None:
                lp = cache(h, y, lp)
            total -= lp.double().sum().item()
            pbar.update(end - start, status=f"{(end) / (time.perf_counter() - t0):,.0f} tok/s")
            start = end
    model.train(was_training)
    return total, n_pred
