"""Sensitivity stage: per-tensor pruning sensitivity and a schedule hitting a total sparsity.

    python -m micronet.sensitivity name=<trained run> target=<s> [step=S] [val_tokens=N]
    python -m micronet.prune name=<trained run> prune=sensitivity prune.target=<s>

For every prunable tensor (:func:`micronet.prune.prunable_names`) and every sparsity of ``sparsities``,
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
import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import ConfigError, typed
from micronet.data.corpus import DataConfig, load_corpus
from micronet.stagekit.evaluation import evaluate_stream, load_model, pick_device
from micronet.model.transformer import TransformerLM
from micronet.runs.progress import bar
from micronet.compress.prune import magnitude_mask, original, prunable_names
from micronet.runs.results import RunDir, atomic_write_bytes, atomic_write_text, write_json
from micronet.scoring.counts import ModelCounts

log = logging.getLogger(__name__)


@dataclass
class SensitivityConfig:
    """``conf/sensitivity.yaml``."""

    name: str = "???"
    step: int | None = None  # None: newest checkpoint
    target: float = 0.358  # total sparsity over the counted parameters
    sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    val_tokens: int = 20000  # validation tokens per measurement
    chunk_len: int = 4032
    initial_fraction: float = 0.5  # AGP initial sparsity = this x final
    device: str = "auto"
    threads: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target (sparsity) must be in [0, 1), got {self.target}")
        if not self.sparsities or any(not 0.0 < s <= 1.0 for s in self.sparsities):
            raise ValueError(f"sparsities must be a non-empty list in (0, 1], got {self.sparsities}")
        if self.val_tokens < 1 or self.chunk_len < 1 or not 0.0 <= self.initial_fraction <= 1.0:
            raise ValueError("val_tokens and chunk_len must be positive, initial_fraction in [0, 1]")


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


def run(cfg: DictConfig) -> dict:
    """Measure (or reuse) the curves of a run's checkpoint and write the schedule for ``target``."""
    sc = typed(SensitivityConfig, cfg, "sensitivity")
    rd = RunDir(sc.name).require()
    with rd.guard("sensitivity"):
        setup_logging(rd.log_path("sensitivity"))
        if sc.threads:
            torch.set_num_threads(sc.threads)
        device = pick_device(sc.device)
        model, ckpt = load_model(rd, sc.step, device)
        step = int(ckpt["step"])
        names = prunable_names(model.cfg)
        key = {"step": step, "val_tokens": sc.val_tokens, "sparsities": list(sc.sparsities), "names": names}
        cpath = rd.sensitivity_curves_path(step)
        cached = json.loads(cpath.read_text()) if cpath.exists() else {}
        if cached.get("key") == key:
            base, curves = cached["base"], cached["curves"]
            log.info("reusing %s", cpath.name)
        else:
            corpus = load_corpus(typed(DataConfig, ckpt["data_config"], "data"))
            base, curves = measure_curves(model, corpus.valid[: sc.val_tokens + 1], names, list(sc.sparsities),
                                          sc.chunk_len, device)
            write_json(cpath, {"key": key, "base": base, "curves": curves})
        counts = ModelCounts.from_config(model.cfg)
        numels = {n: original(model, n).numel() for n in names}
        finals = allocate(base, curves, list(sc.sparsities), numels, counts.counted_numel, sc.target)
        finals = {n: round(s, 4) for n, s in finals.items()}
        achieved = sum(s * numels[n] for n, s in finals.items()) / counts.counted_numel
        out = {"name": rd.name, "step": step, "target": sc.target, "achieved": achieved,
               "counted_numel": counts.counted_numel, "val_tokens": sc.val_tokens, "base_ppl": math.exp(base),
               "initial_fraction": sc.initial_fraction,
               "targets": {n: [round(s * sc.initial_fraction, 4), s] for n, s in finals.items()}}
        atomic_write_text(rd.sensitivity_path(sc.target), OmegaConf.to_yaml(OmegaConf.create(out)))
        plot(rd.sensitivity_path(sc.target, "png"), base, curves, list(sc.sparsities), finals)
    log.info("%s step %d: schedule for %.4f (achieved %.4f) in %s", rd.name, step, sc.target, achieved,
             rd.sensitivity_path(sc.target).name)
    print(f"wrote {rd.sensitivity_path(sc.target)} (total sparsity {achieved:.4f}) and its .png")
    return out


main = stage_main("sensitivity", run)

if __name__ == "__main__":
    from micronet.compress.sensitivity import main as canonical_main  # the canonical module (see micronet.quantize)

    canonical_main()
