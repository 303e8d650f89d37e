"""Sensitivity stage: per-tensor pruning sensitivity and a schedule hitting a total sparsity.

    python -m micronet.sensitivity name=<trained run> target=<s> [step=S] [val_tokens=N]
    python -m micronet.prune name=<trained run> prune=sensitivity prune.target=<s>

Measures (or reuses, from ``results/<name>/sensitivity_step<S>_curves.json``) the one-shot pruning
curve of every prunable tensor on the first ``val_tokens`` validation tokens, allocates final
sparsities for ``target`` x the scorer's counted parameters, and writes ``sensitivity_<target>.yaml``
(the schedule ``prune=sensitivity`` reads) and ``sensitivity_<target>.png``. The method is
:mod:`micronet.compress.sensitivity`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from micronet.compress.prune import original, prunable_names
from micronet.compress.sensitivity import allocate, measure_curves, plot
from micronet.runs.cli import stage_main
from micronet.runs.results import atomic_write_text, write_json
from micronet.scoring.counts import ModelCounts
from micronet.stagekit.preamble import open_stage

log = logging.getLogger(__name__)


@dataclass
class SensitivityConfig:
    """``conf/sensitivity.yaml``."""

    name: str = "???"
    step: int | str | None = None  # None: newest checkpoint
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


def run(cfg: DictConfig) -> dict:
    """Measure (or reuse) the curves of a run's checkpoint and write the schedule for ``target``."""
    with open_stage("sensitivity", SensitivityConfig, cfg, guard=True) as st:
        sc, rd, model, step = st.cfg, st.run, st.model, st.step
        names = prunable_names(model.cfg)
        key = {"step": step, "val_tokens": sc.val_tokens, "sparsities": list(sc.sparsities), "names": names}
        cpath = rd.sensitivity_curves_path(step)
        cached = json.loads(cpath.read_text()) if cpath.exists() else {}
        if cached.get("key") == key:
            base, curves = cached["base"], cached["curves"]
            log.info("reusing %s", cpath.name)
        else:
            base, curves = measure_curves(model, st.corpus().valid[: sc.val_tokens + 1], names,
                                          list(sc.sparsities), sc.chunk_len, st.device)
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
    main()
