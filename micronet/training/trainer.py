"""The training loop: :class:`Trainer` holds the model, optimizer and RNG state of one run.

Adam with linear warmup then cosine decay, grad-norm clipping, random-start chunks, periodic
validation, checkpoints in ``results/<name>/models/``; a resumed run continues bit-for-bit. The train
stage (:mod:`micronet.train`) drives it; so do prune (masks as a step hook) and quantization-aware
training (:mod:`micronet.quantize`). Distillation (:mod:`micronet.training.distill`) plugs into the
loss, torchrun through :mod:`micronet.training.distributed`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any, Callable

import numpy as np
import torch

from micronet.data.batches import sample_batch
from micronet.data.corpus import Corpus, DataConfig
from micronet.model.cache import CacheConfig, EvalCache, attach_cache
from micronet.model.evaluation import evaluate_stream
from micronet.model.hebbian import HebbianConfig, HebbianSoftmax
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.cli import StopSignals
from micronet.runs.config import ConfigError, MicronetError, as_dict
from micronet.runs.device import pick_device
from micronet.runs.progress import bar
from micronet.runs.results import CheckpointError, RunDir, append_csv_row, code_version, truncate_csv
import micronet.training.distributed as distributed  # the module, not the package (whose __init__ imports this one)
from micronet.training.config import OptimConfig, TrainConfig, lr_at, resolve_amp, same_model
from micronet.training.distill import Distiller

log = logging.getLogger(__name__)


class _ValidationAborted(Exception):
    """Raised by the signal handler armed during a validation pass (see :meth:`Trainer._validate`)."""


def _amp_context(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class Trainer:
    """Holds the model, optimizer and RNG state of one run; ``train()`` runs the loop."""

    distill: Distiller | None = None  # set by run() when distill.teacher is given
    # Called as hook(trainer) after every optimizer step (micronet.prune: masks); set per instance.
    after_step: tuple[Callable[["Trainer"], None], ...] = ()
    extra_state: dict | None = None  # extra top-level checkpoint entries (e.g. quant, lineage)

    def __init__(self, run: RunDir, cfg: TrainConfig, optim: OptimConfig, model_cfg: ModelConfig,
                 data_cfg: DataConfig, corpus: Corpus, full_config: dict,
                 cache_cfg: CacheConfig | None = None, hebbian_cfg: HebbianConfig | None = None):
        self.run, self.cfg, self.optim_cfg, self.corpus = run, cfg, optim, corpus
        self.model_cfg, self.data_cfg, self.full_config = model_cfg, data_cfg, full_config
        self.device = distributed.local_device(pick_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.model = TransformerLM(model_cfg).to(self.device)
        # The training cache's lambda/theta are model parameters: attach before the optimizer sees them.
        self.cache_cfg = cache_cfg or CacheConfig()
        self.cache = attach_cache(self.model, self.cache_cfg)
        if distributed.rank() > 0:  # the same initial weights on every rank, then its own dropout stream
            torch.manual_seed(cfg.seed + distributed.rank())
        # The forward + loss that DDP (torchrun) synchronises; the model itself is used unwrapped.
        self.objective = distributed.wrap(distributed.Objective(self.model, self._loss), self.device)
        hebbian_cfg = hebbian_cfg or HebbianConfig()
        self.hebbian = HebbianSoftmax(self.model.softmax, hebbian_cfg) if hebbian_cfg.enabled else None
        # fused: one kernel per step instead of ~10 per parameter tensor (CPU and CUDA).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                          eps=optim.eps, weight_decay=optim.weight_decay, fused=True)
        self.rng = np.random.default_rng(cfg.seed)
        self.amp = resolve_amp(cfg.amp, self.device)  # autocast precision; weights and Adam state stay fp32
        if cfg.amp == "auto":
            log.info("train.amp=auto: %s on %s (train.amp=none for exact fp32)",
                     "bf16 autocast" if self.amp == "bf16" else "fp32, no fast bf16", self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.step = 0
        self.tokens = 0
        self.bad_steps = 0  # non-finite steps skipped so far in the run (bounded by cfg.max_bad_steps)
        self.pending_losses: list[float] = []  # train losses since the last validation (checkpointed: exact CSV)
        self.pending_validation = False  # a signal interrupted the validation of self.step: redo it on resume
        self.tb = None  # a micronet.training.tb_log.TensorBoardLog (train.tensorboard=true, rank 0)
        self.grad_norm: torch.Tensor | None = None  # of the last step, before clipping (optim.clip > 0)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue bit-for-bit."""
        rng = {"torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng = distributed.with_rank_rngs(rng)  # torchrun: every rank's dropout stream too
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "tokens": self.tokens, "rng": rng,
            "model_config": as_dict(self.model_cfg), "data_config": as_dict(self.data_cfg),
            "cache_config": as_dict(self.cache_cfg),
            "hebbian": self.hebbian.state_dict() if self.hebbian is not None else None,
            "data_manifest": self.corpus.fingerprint(), "corpus": self.corpus.record(),
            "train_steps": self.cfg.steps,  # the lr schedule's length (a resume with another one is refused)
            "bad_steps": self.bad_steps, "pending_losses": list(self.pending_losses),
            "pending_validation": self.pending_validation,
            "code": code_version(), **(self.extra_state or {}),
        }

    def save(self) -> None:
        state = self.state()  # under torchrun every rank takes part (RNG states), rank 0 writes
        path = distributed.on_main(lambda: self.run.save(self.step, state))
        if path is not None:
            log.info("saved %s", path)

    def resume(self, planned_steps: int | None = None) -> bool:
        """Load the newest good checkpoint if there is one; refuse one of another model, or of another
        ``train.steps`` unless ``train.extend`` (``planned_steps``: the steps of a checkpoint that does
        not record them, e.g. from the run's config.yaml)."""
        if not self.run.steps():
            return False
        ckpt = self.run.load(map_location=self.device)
        if not same_model(ckpt.get("model_config"), as_dict(self.model_cfg)):
            raise CheckpointError(
                f"{self.run.path} holds a checkpoint of a different model config; "
                f"use another name or the same model settings (checkpoint: {ckpt.get('model_config')})")
        if (ckpt.get("cache_config") or as_dict(CacheConfig())) != as_dict(self.cache_cfg):
            raise CheckpointError(f"{self.run.path} was trained with cache settings "
                                  f"{ckpt.get('cache_config')}; resume with the same cache settings")
        self._check_schedule(int(ckpt["step"]), ckpt.get("train_steps", planned_steps))
        self.model.load_state_dict(ckpt["model"])
        if self.hebbian is not None:
            if ckpt.get("hebbian") is None:
                log.warning("the checkpoint has no Hebbian counts: starting them at 0")
            else:
                self.hebbian.load_state_dict(ckpt["hebbian"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.tokens = int(ckpt["step"]), int(ckpt["tokens"])
        self.bad_steps = int(ckpt.get("bad_steps", 0))
        self.pending_losses = [float(x) for x in ckpt.get("pending_losses", [])]
        self.pending_validation = bool(ckpt.get("pending_validation", False))
        self.rng.bit_generator.state = ckpt["rng"]["numpy"]
        distributed.restore_torch_rng(ckpt["rng"], self.device, self.cfg.seed, self.step)
        log.info("resumed %s from step %d", self.run.path, self.step)
        return True

    def _check_schedule(self, step: int, planned: int | None) -> None:
        """The lr schedule depends on ``train.steps``: another value changes every later learning rate,
        so it takes ``train.extend=true``, which logs the change (``train.stop_after`` is no change)."""
        if planned is None or int(planned) == self.cfg.steps:
            return
        planned, steps = int(planned), self.cfg.steps
        if not self.cfg.extend:
            raise ConfigError(f"{self.run.path} was planned for train.steps={planned} (its learning-rate schedule "
                              f"depends on it), not {steps}: resume with train.steps={planned}, or add "
                              f"train.extend=true to continue under the schedule of {steps} steps")
        log.warning("train.extend: train.steps %d -> %d from step %d: the next learning rate is %.4g instead of "
                    "%.4g and the cosine reaches optim.min_lr at step %d instead of %d", planned, steps, step,
                    lr_at(step, self.optim_cfg, steps), lr_at(step, self.optim_cfg, planned), steps, planned)

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, self.optim_cfg, cfg.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # Every rank draws the global batch (one shared rng stream) and trains on its own rows.
        x, y, starts = sample_batch(self.corpus.train, cfg.batch_size, cfg.chunk_len, self.rng)
        n_tokens, rows = x.numel(), distributed.batch_rows(cfg.batch_size)
        x, y = x[rows].to(self.device), y[rows].to(self.device)
        with _amp_context(self.device, self.amp):
            loss, h = self.objective(x, y, starts[rows])
        batch_loss = distributed.mean(loss.detach())  # of the global batch: the same on every rank
        if not torch.isfinite(batch_loss):
            return self._bad_step("loss", n_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim_cfg.clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.clip)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16: the scaler skips these itself
                return self._bad_step("gradient", n_tokens)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.hebbian is not None:  # acts on the rows the optimizer just updated
            self.hebbian.update(h.detach(), y)
        self.step += 1
        self.tokens += n_tokens
        for hook in self.after_step:
            hook(self)
        return batch_loss.item()

    def _loss(self, x: torch.Tensor, y: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss of rows x (B, T) -> y (B, T) at ``starts`` (B,), and the final hidden states."""
        h, _ = self.model(x)  # (B, T, d_model); training chunks start with no memory
        if self.distill is not None and self.cache is None:  # log p(target) from the soft loss's softmax pass
            return self.distill.loss(self.model, h, y, starts, self.step, self.cfg.steps), h
        lp = self.model.target_log_probs(h, y)  # (B, T) log p(target)
        if self.cache is not None:
            lp = self.cache(h, y, lp)  # mixed with each sequence's own cache
        loss = -lp.mean()
        if self.distill is not None:  # h * NLL(lp) + (1 - h) * soft CE vs the teacher's top-k
            loss = self.distill.loss(self.model, h, y, starts, self.step, self.cfg.steps, target_lp=lp)
        return loss, h

    def _bad_step(self, what: str, n_tokens: int) -> float:
        """A non-finite loss or gradient: stop with a clear error, or (``max_bad_steps``) skip the update.

        A skipped step still counts (schedule, step hooks) and has consumed its batch and dropout draws,
        so the run stays deterministic and resumable. Returns NaN (not a training loss).
        """
        self.bad_steps += 1
        step, budget = self.step + 1, self.cfg.max_bad_steps
        if self.bad_steps > budget:
            last = self.run.latest_step()
            kept = f"the last checkpoint (step {last}) is kept" if last is not None else "no checkpoint was saved"
            used = f" after skipping {budget} (train.max_bad_steps={budget})" if budget else ""
            raise MicronetError(f"non-finite training {what} at step {step}{used}; {kept}; lower optim.lr, "
                                f"check the data, or let train.max_bad_steps=N skip up to N such steps")
        log.warning("non-finite training %s at step %d: skipped without an update (%d of train.max_bad_steps=%d)",
                    what, step, self.bad_steps, budget)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += n_tokens
        for hook in self.after_step:
            hook(self)
        return math.nan

    def validate(self) -> float:
        tokens = self.corpus.valid
        if self.cfg.val_tokens:
            tokens = tokens[: self.cfg.val_tokens + 1]
        # With a training cache, validate as trained: its window size and current lambda/theta.
        cache = EvalCache(self.cache.n_cache, *self.cache.values()) if self.cache is not None else None
        nll, n = evaluate_stream(self.model, tokens, self.cfg.eval_chunk_len, self.device, desc="valid",
                                 cache=cache)
        return nll / n

    def train(self) -> dict:
        """Run until ``steps`` (or ``stop_after`` steps / a signal); returns the last validation."""
        cfg = self.cfg
        end = cfg.steps if not cfg.stop_after else min(cfg.steps, self.step + cfg.stop_after)
        last: dict = {}
        t0, tok0, tok_s = time.perf_counter(), self.tokens, 0.0
        with StopSignals() as stop, bar(cfg.steps, f"train {self.run.name}", "steps", count=self.step) as pbar:
            if self.pending_validation:  # the last invocation was stopped during this step's validation
                distributed.on_main(lambda: truncate_csv(self.run, self.step - 1))  # a later row is redone
                last = self._validate(stop, tok_s, 0.0) or last
            while self.step < end and not self._stopping(stop):
                loss = self.train_step()
                if math.isfinite(loss):  # NaN: a skipped step (train.max_bad_steps)
                    self.pending_losses.append(loss)
                tok_s = (self.tokens - tok0) / (time.perf_counter() - t0)
                lr = lr_at(self.step - 1, self.optim_cfg, cfg.steps)
                pbar.update(status=f"loss {loss:.3f} | {tok_s:,.0f} tok/s | lr {lr:.2e}")
                if self.tb is not None:
                    self.tb.train_step(self, loss, tok_s, lr)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last = self._validate(stop, tok_s, time.perf_counter() - t0) or last
                    if self.pending_validation:
                        break  # a signal: save at once; validation of this step runs first on resume
                if self.step % cfg.save_every == 0 or self.step == end:
                    self.save()
            if self._stopping(stop):
                self.save()
                raise KeyboardInterrupt if stop.signum == signal.SIGINT else SystemExit(143)
        return last

    def _stopping(self, stop: StopSignals) -> bool:
        """Whether to stop for a signal; under torchrun all ranks stop at the same step if any saw one."""
        stop.signum = distributed.any_rank(stop.signum)
        return bool(stop.signum)

    def _validate(self, stop: StopSignals, tok_s: float, elapsed: float) -> dict | None:
        """Validate ``self.step`` and log its row; None if SIGINT/SIGTERM interrupted it.

        A whole-split validation can take minutes: a signal aborts it at once (so the stage saves and
        exits within seconds) and leaves ``pending_validation`` set, which the checkpoint records.
        """
        armed = [True]

        def abort(signum: int, frame: Any) -> None:
            stop.signum = signum
            if armed[0]:
                armed[0] = False
                raise _ValidationAborted

        self.pending_validation = True
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                if stop.signum:  # signalled during the step: do not start a long pass
                    raise _ValidationAborted
                for s in old:
                    signal.signal(s, abort)
                val = self.validate()
                armed[0] = False  # from here on a signal only sets the flag
            except _ValidationAborted:
                val = None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if distributed.any_rank(val is None):  # every rank validates; one interrupted: all redo it
            log.info("validation of step %d interrupted by a signal: it runs first when the run resumes", self.step)
            return None
        row = self._log_validation(val, tok_s, elapsed)
        self.pending_validation = False
        return row

    def _log_validation(self, val: float, tok_s: float, elapsed: float) -> dict:
        losses, self.pending_losses = self.pending_losses, []
        row = {"step": self.step, "tokens": self.tokens, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_loss": val, "val_ppl": math.exp(val), "lr": lr_at(self.step - 1, self.optim_cfg, self.cfg.steps),
               "tokens_per_s": tok_s, "elapsed_s": elapsed}
        distributed.on_main(lambda: append_csv_row(self.run, row))
        if self.tb is not None:
            self.tb.validation(row)
        log.info("step %d: train loss %.4f, val loss %.4f, val ppl %.2f, %.0f tok/s",
                 self.step, row["train_loss"], val, row["val_ppl"], tok_s)
        return row
