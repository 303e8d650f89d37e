"""The preamble every checkpoint-reading stage shares: :func:`open_stage`.

    with open_stage("cache_search", CacheSearchConfig, cfg) as st:
        corpus = st.corpus()                      # the checkpoint's data, vocabulary checked
        ... st.cfg, st.run, st.device, st.model, st.ckpt, st.step ...

Typed config (one-line errors), ``RunDir.require``, the guard (stages that write more than one
atomic file), the stage log, torch threads, the device, and the checkpoint's model, in that order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

import torch

from micronet.compress.checkpoint import load_model
from micronet.data.corpus import Corpus, DataConfig, load_corpus
from micronet.model.transformer import TransformerLM
from micronet.runs.cli import setup_logging
from micronet.runs.config import typed
from micronet.runs.device import pick_device
from micronet.runs.results import CheckpointError, RunDir
from micronet.stagekit.released import require_run

T = TypeVar("T")


@dataclass
class Stage(Generic[T]):
    """An opened stage: its typed config, results dir, device and the checkpoint's model."""

    cfg: T
    run: RunDir
    device: torch.device
    model: TransformerLM
    ckpt: dict

    @property
    def step(self) -> int:
        """The checkpoint's step (the newest one when the config's ``step`` is None)."""
        return int(self.ckpt["step"])

    def corpus(self, progress: bool = True) -> Corpus:
        """The corpus the checkpoint was trained on; :class:`CheckpointError` if its vocabulary differs."""
        corpus = load_corpus(typed(DataConfig, self.ckpt["data_config"], "data"), progress=progress)
        if corpus.vocab_size != self.model.cfg.vocab_size:
            raise CheckpointError(f"data vocab {corpus.vocab_size} != model vocab {self.model.cfg.vocab_size}")
        return corpus


@contextlib.contextmanager
def open_stage(stage: str, cls: type[T], node: Any, *, guard: bool = False) -> Iterator[Stage[T]]:
    """Open ``results/<name>`` for ``stage`` and load checkpoint ``step`` of it.

    ``node``: the stage's Hydra config (or an already typed ``cls``); ``cls`` needs ``name`` and
    ``step`` and may have ``device`` (default cpu) and ``threads`` (0: torch's default).
    ``guard``: hold the directory for the whole stage (see :meth:`RunDir.guard`).
    """
    cfg = node if isinstance(node, cls) else typed(cls, node, stage)
    rd = require_run(cfg.name)  # a released model (release/<name>/) becomes a run the first time
    device = pick_device(getattr(cfg, "device", "cpu"))  # an unavailable device: one line, before guard and log
    with rd.guard(stage) if guard else contextlib.nullcontext():
        setup_logging(rd.log_path(stage))
        if getattr(cfg, "threads", 0):
            torch.set_num_threads(cfg.threads)
        model, ckpt = load_model(rd, cfg.step, device)
        yield Stage(cfg, rd, device, model, ckpt)
