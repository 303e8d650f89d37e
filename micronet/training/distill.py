"""Distillation from a teacher's stored top-k soft labels (spec section 5).

    python -m micronet.train experiment=<student> distill.teacher=<teacher run> [distill.topk=30]

Per position the student's loss is

    h * NLL(target) + (1 - h) * ( - sum_j q_j log p_student(id_j) ),   q = p_teacher(id) / sum_j p_teacher(id_j)

over the teacher's k stored ids, renormalised the same way wherever the ids fall (head or
tail bins; the original treated them differently). ``h`` rises linearly from ``hard_min`` at
step 0 to ``hard_max`` at ``steps``. The hard term is the NLL of the target log-probability the
trainer computed when it has one (a training cache's mixed probability), else of the student's own,
gathered as a (k+1)-th id in the same softmax pass.

log p_student(id) for k ids per position comes from the adaptive softmax's k-target
``target_log_probs`` (head for all rows, tail i only for rows with an id in tail i): the blocked
kernel of the hard loss, never (rows x vocab) log-probabilities. Soft labels are read per batch
with pread (:class:`SoftLabels`), never loaded or kept mapped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from micronet.data.corpus import Corpus
from micronet.model.adaptive import AdaptiveLogSoftmax
from micronet.runs.config import typed
from micronet.runs.results import RunDir
from micronet.training.soft_labels import (IDS_DTYPE, PROBS_DTYPE, RowFile, SoftLabelError, check_data, read_manifest,
                                           soft_label_dir)

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distillation settings of the train stage; ``teacher: null`` turns it off."""

    teacher: str | None = None  # results name of the teacher run
    topk: int = 30
    step: int | str | None = None  # teacher step of the soft labels (or best); None = newest complete set
    hard_min: float = 0.5  # weight of the hard NLL at step 0 ...
    hard_max: float = 0.95  # ... rising linearly to this at the last step

    def validate(self) -> None:
        if not 0.0 <= self.hard_min <= self.hard_max <= 1.0:
            raise ValueError(f"distill: need 0 <= hard_min <= hard_max <= 1, got {self.hard_min}, {self.hard_max}")
        if self.topk < 1:
            raise ValueError(f"distill.topk must be a positive integer, got {self.topk}")


def hard_weight(step: int, steps: int, hard_min: float, hard_max: float) -> float:
    """Weight of the hard NLL for optimizer step ``step`` (0-based) of ``steps``: linear in step/steps."""
    frac = min(1.0, max(0.0, step / max(1, steps)))
    return hard_min + (hard_max - hard_min) * frac


class SoftLabels:
    """Read access to a complete soft-label directory (rows read with pread, see :class:`RowFile`)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise SoftLabelError(f"no soft labels in {self.directory} (no readable manifest.json)")
        if not manifest.get("complete"):
            raise SoftLabelError(
                f"soft labels {self.directory} are incomplete ({manifest.get('rows_done')} of {manifest.get('tokens')} "
                f"rows); finish them with python -m micronet.soft_labels name={manifest.get('teacher')} "
                f"topk={manifest.get('topk')} step={manifest.get('step')}")
        self.manifest = manifest
        self.topk, self.tokens = int(manifest["topk"]), int(manifest["tokens"])
        self._ids = RowFile(self.directory / "ids.npy", IDS_DTYPE, (self.tokens, self.topk))
        self._probs = RowFile(self.directory / "probs.npy", PROBS_DTYPE, (self.tokens, self.topk))

    def close(self) -> None:
        """Release the files."""
        self._ids.close()
        self._probs.close()

    def rows(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``s + 1 .. s + length`` for each start ``s``: ids (B, length, k) int32, probs float16.

        These are the teacher's distributions for the targets ``y[b]`` of a batch drawn by
        :func:`micronet.data.batches.sample_batch` with the same ``starts``.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + 1 + length > self.tokens):
            raise SoftLabelError(f"rows {starts.min() + 1}..{starts.max() + length} are outside 0..{self.tokens - 1}")
        ids = np.stack([self._ids.read(int(s) + 1, length) for s in starts])
        probs = np.stack([self._probs.read(int(s) + 1, length) for s in starts])
        return ids, probs


def find_soft_labels(teacher: str, topk: int, step: int | str | None) -> Path:
    """The directory of ``teacher``'s top-``topk`` soft labels at ``step`` (None: newest complete)."""
    rd = RunDir(teacher)
    if not rd.exists():
        raise SoftLabelError(f"no results directory {rd.path} for distill.teacher={teacher}")
    step = rd.resolve_step(step)  # best: the teacher's best-validation checkpoint
    if step is not None:
        return soft_label_dir(rd, topk, step)
    found = sorted(((int(p.name.rsplit("step", 1)[1]), p) for p in (rd.path / "soft_labels").glob(f"top{topk}_step*")
                    if p.name.rsplit("step", 1)[1].isdigit()), reverse=True)
    for _, p in found:
        if (read_manifest(p) or {}).get("complete"):
            return p
    have = ", ".join(f"{p.name} ({(read_manifest(p) or {}).get('rows_done')} rows done)" for _, p in found) or "none"
    raise SoftLabelError(f"{teacher} has no complete top-{topk} soft labels (found: {have}); run "
                         f"python -m micronet.soft_labels name={teacher} topk={topk}")


def gather_log_probs(softmax: AdaptiveLogSoftmax, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student log-probabilities of given word ids: h (..., d_model), ids (..., k) -> (..., k) float32.

    Equal to ``model.log_probs(h).gather(-1, ids)`` (values and gradients) without holding
    (rows x vocab) log-probabilities: the adaptive softmax's k-target ``target_log_probs`` (the
    blocked kernel of the hard loss, bf16 under bf16 autocast, each tail only for rows with an id in it).
    """
    flat_h = h.reshape(-1, h.shape[-1])  # (N, d_model)
    flat_ids = ids.reshape(-1, ids.shape[-1]).long()  # (N, k)
    return softmax.target_log_probs(flat_h, flat_ids).view(*h.shape[:-1], ids.shape[-1])


def soft_cross_entropy(student_lp: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position - sum_j q_j log p_j with q the teacher's top-k renormalised to sum 1.

    student_lp, teacher_probs: (..., k) -> (ce (...), valid (...) bool). Positions whose stored
    probabilities sum to 0 (row 0 of a soft-label file: no context) are not valid and get ce 0.
    """
    p = teacher_probs.float()
    total = p.sum(-1, keepdim=True)  # (..., 1)
    valid = total.squeeze(-1) > 0
    q = p / total.clamp_min(torch.finfo(torch.float32).tiny)
    return -(q * student_lp).sum(-1) * valid, valid


def distill_loss(target_lp: torch.Tensor, student_lp: torch.Tensor, teacher_probs: torch.Tensor,
                 hard: float) -> torch.Tensor:
    """hard * mean NLL + (1 - hard) * mean soft CE (over valid positions).

    target_lp (B, T): log p(target) as the trainer computed it; student_lp, teacher_probs (B, T, k).
    """
    ce, valid = soft_cross_entropy(student_lp, teacher_probs)
    soft = ce.sum() / valid.sum().clamp_min(1)
    return hard * -target_lp.mean() + (1.0 - hard) * soft


class Distiller:
    """The soft labels of one teacher plus the loss schedule; used by the trainer every step."""

    def __init__(self, cfg: DistillConfig, labels: SoftLabels):
        self.cfg, self.labels = cfg, labels

    def loss(self, model: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, starts: np.ndarray, step: int,
             steps: int, target_lp: torch.Tensor | None = None) -> torch.Tensor:
        """Distillation loss of a batch: h (B, T, d_model), targets y (B, T); ``starts`` from sample_batch.

        ``target_lp`` (B, T): log p(target) as the trainer computed it (a cache-mixed probability, say);
        None: the student's own, gathered in the same softmax pass as the teacher's ids (one pass, not two).
        """
        ids, probs = self.labels.rows(starts, y.shape[1])  # (B, T, k) each, read from disk
        ids_t = torch.from_numpy(ids.astype(np.int64)).to(h.device)
        probs_t = torch.from_numpy(probs.astype(np.float32)).to(h.device)
        if target_lp is None:
            both = gather_log_probs(model.softmax, h, torch.cat([ids_t, y[..., None]], -1))  # (B, T, k + 1)
            student_lp, target_lp = both[..., :-1], both[..., -1]
        else:
            student_lp = gather_log_probs(model.softmax, h, ids_t)  # (B, T, k)
        hard = hard_weight(step, steps, self.cfg.hard_min, self.cfg.hard_max)
        return distill_loss(target_lp, student_lp, probs_t, hard)


def build_distiller(node: Any, corpus: Corpus) -> Distiller | None:
    """The :class:`Distiller` of the ``distill`` config group, or None when ``teacher`` is null.

    Refuses (:class:`SoftLabelError`) soft labels that are incomplete, of another top-k, or made
    from data other than ``corpus`` (train file hash, token count, vocabulary).
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    cfg = typed(DistillConfig, node, "distill")
    if not cfg.teacher:
        return None
    labels = SoftLabels(find_soft_labels(cfg.teacher, cfg.topk, cfg.step))
    try:
        if labels.topk != cfg.topk:
            raise SoftLabelError(f"{labels.directory} holds top-{labels.topk}, not distill.topk={cfg.topk}")
        check_data(labels.manifest, corpus, f"soft labels {labels.directory}")
    except SoftLabelError:
        labels.close()
        raise
    log.info("distilling from %s step %s (top %d, %s rows), hard weight %.2f -> %.2f", cfg.teacher,
             labels.manifest["step"], labels.topk, f"{labels.tokens:,}", cfg.hard_min, cfg.hard_max)
    return Distiller(cfg, labels)
