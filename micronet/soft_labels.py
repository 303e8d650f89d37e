"""Soft-labels stage: a teacher's top-k next-word distribution for every training token.

    python -m micronet.soft_labels name=<teacher> [topk=30] [step=S]

Writes (or resumes, bit for bit) ``results/<teacher>/soft_labels/top<k>_step<S>/``: the teacher runs
over the train split batch 1, online, memory carried, and row r holds the top-k of p(. | tokens < r).
The format, resume protocol and writer are :mod:`micronet.training.soft_labels`; distillation
(:mod:`micronet.training.distill`) reads them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from omegaconf import DictConfig

from micronet.runs.cli import stage_main
from micronet.stagekit.preamble import open_stage
from micronet.training.soft_labels import data_fingerprint, generate_soft_labels, soft_label_dir

log = logging.getLogger(__name__)


@dataclass
class SoftLabelConfig:
    """Settings of the soft-labels stage."""

    name: str = "???"  # the teacher run
    step: int | str | None = None  # teacher checkpoint; None = newest
    topk: int = 30
    chunk_len: int = 4032  # tokens per teacher forward pass; memory is carried between chunks
    block_tokens: int = 65536  # flush + record progress about this often (rounded to whole chunks)
    row_block: int = 0  # rows per full-softmax block for top-k; 0 = about 8 MB of fp32 log-probs
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    stop_after_blocks: int = 0  # stop cleanly after this many blocks in this invocation; 0 = run to the end

    def validate(self) -> None:
        for k in ("topk", "chunk_len", "block_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"soft_labels.{k} must be a positive integer, got {getattr(self, k)}")
        if self.row_block < 0 or self.stop_after_blocks < 0 or self.threads < 0:
            raise ValueError("soft_labels.row_block, stop_after_blocks and threads must be >= 0")


def run(cfg: DictConfig) -> dict:
    """Generate (or resume) the soft labels of a teacher run; returns the manifest."""
    with open_stage("soft_labels", SoftLabelConfig, cfg, guard=True) as st:
        scfg, rd, step = st.cfg, st.run, st.step
        corpus = st.corpus()
        out_dir = soft_label_dir(rd, scfg.topk, step)
        meta = {"teacher": rd.name, "step": step, "data": data_fingerprint(corpus)}
        t0 = time.perf_counter()
        manifest = generate_soft_labels(st.model, corpus.train, out_dir, scfg.topk, meta, scfg.chunk_len,
                                        scfg.block_tokens, scfg.row_block, st.device, scfg.stop_after_blocks)
        log.info("%s: %d of %d rows done in %.0f s", out_dir, manifest["rows_done"], manifest["tokens"],
                 time.perf_counter() - t0)
    state = "complete" if manifest["complete"] else f"{manifest['rows_done']} of {manifest['tokens']} rows"
    print(f"soft labels of {rd.name} step {step} (top {scfg.topk}): {state}; in {out_dir}")
    return manifest


main = stage_main("soft_labels", run)

if __name__ == "__main__":
    main()
