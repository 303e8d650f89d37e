"""Pruning sensitivity analysis: per-tensor loss curves and a schedule hitting a total sparsity.

The sensitivity stage (:mod:`micronet.sensitivity`) measures and writes them; ``prune=sensitivity``
reads the schedule.

For every prunable tensor (:func:`micronet.compress.prune.prunable_names`) and every sparsity of ``sparsities``,
the tensor alone is magnitude-pruned one-shot and the validation loss measured on the first
``val_tokens`` tokens (batch 1, online). The curves are cached in
``results/<name>/sensitivity_step<S>_curves.json`` (reused for other targets).

Allocation: a tensor's final sparsity is the largest s whose loss increase stays within a common
threshold delta (curves linear between grid points, made non-decreasing); delta is bisected so
that sum_t s_t numel_t = target x counted parameters (the scorer's ``counted_numel``: everything but
LayerNorms, tied tables once). Initial sparsities are ``initial_fraction`` x final. Writes
``sensitivity_<target>.yaml`` (the schedule ``prune=sensitivity`` reads) and ``sensitivity_<target>.png``.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import torch

from micronet.compress.prune import magnitude_mask, original
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import TransformerLM
from micronet.runs.config import ConfigError
from micronet.runs.progress import bar
from micronet.runs.results import atomic_write_bytes

log = logging.getLogger(__name__)


@torch.no_grad()
def measure_curves(model: TransformerLM, tokens: np.ndarray, names: list[str], sparsities: list[float],
                   chunk_len: int, device: torch.device | str = "cpu") -> tuple[float, dict[str, list[float]]]:
    """Base loss and, per tensor, the loss with that tensor alone pruned to each sparsity (nats/token)."""
    nll, n = evaluate_stream(model, tokens, chunk_len, device, desc="base")
    base, curves = nll / n, {}
    with bar(len(names) * len(sparsities), "sensitivity", "evals") as pbar:
        for name in names:
            w = original(model, name)
            saved = w.clone()
            curves[name] = []
            for s in sparsities:
                w.mul_(magnitude_mask(saved, s))
                nll, n = evaluate_stream(model, tokens, chunk_len, device, desc=f"{name} {s:g}")
                curves[name].append(nll / n)
                w.copy_(saved)
                pbar.update(status=f"{name} s={s:g}: loss {curves[name][-1]:.4f}")
    return base, curves


def allocate(base: float, curves: dict[str, list[float]], sparsities: list[float], numels: dict[str, int],
             counted: int, target: float) -> dict[str, float]:
    """Final sparsity per tensor, common loss-increase threshold, total = target x counted (bisection)."""
    grid = np.array([0.0, *sparsities])
    inc = {}
    for name, ys in curves.items():
        d = np.maximum.accumulate(np.maximum(np.array([0.0, *ys]) - base, 0.0))
        inc[name] = d + grid * 1e-9  # strictly increasing: a continuous inverse
    def at(delta: float) -> dict[str, float]:
        return {n: float(np.interp(delta, d, grid)) for n, d in inc.items()}

    def total(delta: float) -> float:
        return sum(s * numels[n] for n, s in at(delta).items()) / counted
    hi = max(float(d[-1]) for d in inc.values())
    if total(hi) < target - 1e-9:
        raise ConfigError(f"target {target} is out of reach: pruning every prunable tensor to its largest grid "
                          f"sparsity gives {total(hi):.4f} of the counted parameters")
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return at(hi)


def plot(path, base: float, curves: dict[str, list[float]], sparsities: list[float], finals: dict[str, float]) -> None:
    """PNG of validation perplexity vs sparsity per tensor, chosen finals marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"embed": "C0", "softmax": "C1", "attn.qkv": "C2", "attn.out": "C3", "ffn.0": "C4", "ffn.2": "C5"}
    seen = set()
    for name, ys in curves.items():
        kind = next((k for k in colours if k in name), "embed")
        xs, ppl = [0.0, *sparsities], [math.exp(base), *(math.exp(min(y, 50.0)) for y in ys)]
        ax.plot(xs, ppl, color=colours[kind], alpha=0.6, lw=1, label=None if kind in seen else kind)
        seen.add(kind)
        ax.plot([finals[name]], [np.interp(finals[name], xs, ppl)], "o", color=colours[kind], ms=3)
    lows, highs = ax.get_ylim()
    if highs > 3 * lows:  # log only when the curves span a real range
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of the one pruned tensor")
    ax.set_ylabel("validation perplexity")
    ax.set_title("one-shot magnitude pruning sensitivity (dots: chosen final sparsity)")
    ax.legend(fontsize=8)
    buf = io.BytesIO()  # rendered in memory, then written atomically like every results file
    fig.savefig(buf, dpi=100, format="png")
    atomic_write_bytes(path, buf.getvalue())
