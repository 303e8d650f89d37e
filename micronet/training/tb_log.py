"""TensorBoard curves of a training run (opt-in: ``train.tensorboard=true``, ``pip install -e '.[tb]'``).

Event files go to ``results/<name>/tb/``, written by rank 0 only. Scalars, by optimizer step:

* every step: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm`` (before clipping;
  with ``optim.clip > 0``), and with a training cache ``cache/lambda``, ``cache/theta``;
* every validation: ``val/loss``, ``val/ppl``, ``train/mean_loss`` and ``train/ppl`` (mean train loss
  since the previous validation, as in ``train_results.csv``).

A resumed run appends to the same curves: the writer starts with ``purge_step`` = the resumed step + 1,
so TensorBoard drops the points an interrupted invocation wrote after its last checkpoint (they are
trained again, identically). Nothing here touches a random number generator.
"""

from __future__ import annotations

import math
from typing import Any

from micronet.runs.config import ConfigError
from micronet.runs.results import RunDir


class TensorBoardLog:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``run``'s ``tb/`` folder, from step ``step`` on."""

    def __init__(self, run: RunDir, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install -e '.[tb]' "
                              "(or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(run.tb_dir), purge_step=step + 1 if step else None)

    def train_step(self, trainer: Any, loss: float, tokens_per_s: float, lr: float) -> None:
        """Scalars of the optimizer step ``trainer.step`` just made (a skipped step: NaN loss, left out)."""
        step, add = trainer.step, self.writer.add_scalar
        if math.isfinite(loss):
            add("train/loss", loss, step)
        add("train/lr", lr, step)
        add("train/tokens_per_s", tokens_per_s, step)
        norm = getattr(trainer, "grad_norm", None)
        if norm is not None:
            add("train/grad_norm", float(norm), step)
        if trainer.cache is not None:
            lam, theta = trainer.cache.values()
            add("cache/lambda", lam, step)
            add("cache/theta", theta, step)

    def validation(self, row: dict) -> None:
        """Scalars of one ``train_results.csv`` row; flushed, so the curves are on disk at each validation."""
        step, add = row["step"], self.writer.add_scalar
        add("val/loss", row["val_loss"], step)
        add("val/ppl", row["val_ppl"], step)
        if math.isfinite(row["train_loss"]):
            add("train/mean_loss", row["train_loss"], step)
            add("train/ppl", math.exp(row["train_loss"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_log(enabled: bool, run: RunDir, step: int, main: bool) -> TensorBoardLog | None:
    """The run's TensorBoard log if ``enabled`` and this is the main rank, else None."""
    return TensorBoardLog(run, step) if enabled and main else None


__all__ = ["TensorBoardLog", "open_log"]
