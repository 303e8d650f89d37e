"""Magnitude pruning on the AGP cubic schedule: prunable tensors, schedules, masks and the pruner.

Prunable tensor t follows

    s_t(e) = s_f + (s_i - s_f) (1 - e / E)^3,   e = 0 .. E = prune.rounds       (Zhu & Gupta 2017)

with its mask recomputed (the round(s numel) smallest magnitudes) at step ``e * prune.every``
(:class:`AGPPruner`, a :class:`~micronet.training.trainer.Trainer` step hook). Schedules: the original's
``0.239`` / ``0.358`` / ``0.477`` (targets from :mod:`micronet.compress.schedules`), ``uniform``
(``prune.target`` everywhere) and ``sensitivity`` (:mod:`micronet.compress.sensitivity`'s output).

Masks are ``torch.nn.utils.parametrize`` parametrizations, so every forward (the tied softmax reads the
same table) sees the masked weight. After every optimizer step the originals and Adam's moments are
zeroed at masked positions: momentum cannot regrow a pruned weight and a recomputed mask (magnitudes
of the originals) never revives one. A pruned checkpoint holds plain TransformerLM keys (the masked
weights): a tensor's mask is ``weight != 0``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from micronet.compress.schedules import SCHEDULE_SCALES, prune_targets
from micronet.model.transformer import ModelConfig
from micronet.runs.config import ConfigError
from micronet.runs.results import RunDir

log = logging.getLogger(__name__)

Targets = dict[str, tuple[float, float]]  # parameter name -> (initial, final) sparsity


@dataclass
class PruneConfig:
    """The ``prune`` node: which schedule and how often masks are recomputed."""

    name: str = "0.358"  # the schedule's name; the results dir is prune<name>_<parent>
    kind: str = "table"  # table (the original's, from micronet.compress.schedules) | uniform | sensitivity
    target: float = 0.0  # uniform: every tensor's final sparsity; sensitivity: the total target
    initial: float = 0.0  # uniform: every tensor's initial sparsity
    path: str | None = None  # sensitivity: schedule file; None = results/<parent>/sensitivity_<target>.yaml
    every: int = 1000  # steps between mask recomputations
    rounds: int = 175  # E: recomputations until the final sparsity

    def validate(self) -> None:
        if self.kind not in ("table", "uniform", "sensitivity"):
            raise ValueError(f"prune.kind must be table, uniform or sensitivity, got {self.kind!r}")
        if self.kind == "table" and self.name not in SCHEDULE_SCALES:
            raise ValueError(f"unknown pruning schedule {self.name!r}; expected one of {sorted(SCHEDULE_SCALES)}, "
                             "uniform or sensitivity")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"prune.target (sparsity) must be in [0, 1), got {self.target}")
        if self.kind == "uniform" and not 0.0 <= self.initial <= self.target:
            raise ValueError(f"prune.initial must be in [0, prune.target], got {self.initial}")
        if self.every < 1 or self.rounds < 1:
            raise ValueError(f"prune.every and prune.rounds must be >= 1, got {self.every}, {self.rounds}")


# ----------------------------------------------------------------------------- schedules


def prunable_names(cfg: ModelConfig) -> list[str]:
    """Tensors pruned by spec section 6: tied tables, projections of every bin but the narrowest, every
    qkv/out/FFN weight, tail biases (for the 8.3M exactly the keys of the section-9 table)."""
    n_bins, d = len(cfg.bin_dims), cfg.d_model
    projs = [i for i in range(n_bins - 1) if cfg.bin_dims[i] != d]
    names = [f"embed.tables.{i}.weight" for i in range(n_bins)] + [f"embed.projs.{i}.weight" for i in projs]
    for L in range(cfg.n_layer):
        names += [f"layers.{L}.{m}.weight" for m in ("ffn.0", "ffn.2", "attn.out", "attn.qkv")]
    names += [f"softmax.biases.{i}" for i in range(1, n_bins)] + [f"softmax.projs.{i}.weight" for i in projs]
    return names


def agp_sparsity(s_i: float, s_f: float, e: float, rounds: int) -> float:
    """AGP cubic schedule s(e) = s_f + (s_i - s_f)(1 - e/E)^3, e clipped to [0, E]."""
    e = min(max(e, 0), rounds)
    return s_f + (s_i - s_f) * (1.0 - e / rounds) ** 3


def n_pruned(numel: int, sparsity: float) -> int:
    """Values zeroed at ``sparsity``: numel x s rounded half up (as the scorer's ``from_config``)."""
    return min(numel, math.floor(round(numel * sparsity, 6) + 0.5))


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (shape of w) that drops exactly ``n_pruned`` smallest |w|."""
    k = n_pruned(w.numel(), sparsity)
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        keep[torch.topk(w.detach().abs().flatten(), k, largest=False, sorted=False).indices] = False
    return keep.view(w.shape)


def schedule_targets(pcfg: PruneConfig, model_cfg: ModelConfig, parent: RunDir) -> Targets:
    """(initial, final) sparsity of every prunable tensor of ``model_cfg`` under ``pcfg``."""
    names = prunable_names(model_cfg)
    if pcfg.kind == "uniform":
        return {n: (pcfg.initial, pcfg.target) for n in names}
    if pcfg.kind == "table":
        table = prune_targets(pcfg.name)
    else:
        path = Path(pcfg.path) if pcfg.path else parent.sensitivity_path(pcfg.target)
        if not path.exists():
            raise ConfigError(f"no sensitivity schedule {path}; run `python -m micronet.sensitivity "
                              f"name={parent.name} target={pcfg.target:g}` first or give prune.path")
        raw = OmegaConf.to_container(OmegaConf.load(path))
        table = {k: (float(v[0]), float(v[1])) for k, v in (raw.get("targets") or {}).items()}
    dense = [n for n in names if n not in table]
    if dense:
        log.warning("schedule %s has no target for %d prunable tensors (left dense): %s", pcfg.name, len(dense),
                    ", ".join(dense[:6]) + (" ..." if len(dense) > 6 else ""))
    unknown = sorted(set(table) - set(names))
    if pcfg.kind == "sensitivity" and unknown:
        raise ConfigError(f"sensitivity schedule names tensors this model cannot prune: {unknown[:4]}")
    out = {n: table[n] for n in names if n in table}
    for n, (a, b) in out.items():
        if not 0.0 <= a <= b <= 1.0:
            raise ConfigError(f"bad sparsities for {n}: initial {a}, final {b} (need 0 <= initial <= final <= 1)")
    return out


# ----------------------------------------------------------------------------- masks


class Mask(nn.Module):
    """Parametrization: weight -> 0 where ``mask`` (bool buffer) is False."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.masked_fill(~self.mask, 0.0)


def locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning module, attribute) of a parameter name such as ``softmax.biases.1``."""
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def original(model: nn.Module, name: str) -> torch.Tensor:
    """The stored parameter behind ``name`` (the original of a parametrized tensor)."""
    module, attr = locate(model, name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def mask_of(model: nn.Module, name: str) -> Mask | None:
    """The :class:`Mask` parametrization of ``name``, if any."""
    module, attr = locate(model, name)
    if not parametrize.is_parametrized(module, attr):
        return None
    return next((p for p in module.parametrizations[attr] if isinstance(p, Mask)), None)


def set_mask(model: nn.Module, name: str, keep: torch.Tensor) -> None:
    """Register (first time) or update the mask of ``name`` and zero its original where masked."""
    m = mask_of(model, name)
    if m is None:
        module, attr = locate(model, name)
        parametrize.register_parametrization(module, attr, Mask(keep))
    else:
        m.mask.copy_(keep)
    with torch.no_grad():
        original(model, name).masked_fill_(~keep, 0.0)


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``weight != 0`` for every prunable tensor that has zeros (the masks of a pruned checkpoint)."""
    out = {}
    for name in prunable_names(model.cfg):
        w = original(model, name)
        if bool((w == 0).any()):
            out[name] = w != 0
    return out


def _plain_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``x.parametrizations.w.original`` -> ``x.w``, mask buffers dropped.

    Valid for masks only (original == masked value): the checkpoint is a plain TransformerLM state.
    """
    for key in list(state):
        m = re.fullmatch(r"(.*)\.parametrizations\.([^.]+)\.(original|\d+\.mask)", key)
        if m:
            value = state.pop(key)
            if m.group(3) == "original":
                state[f"{m.group(1)}.{m.group(2)}"] = value


class MaskHolder:
    """Keeps fixed masks through optimizer steps: originals and Adam moments zeroed where masked."""

    def __init__(self, model: nn.Module, names: list[str], optimizer: torch.optim.Optimizer | None = None):
        self.model, self.names, self.optimizer = model, list(names), optimizer

    @torch.no_grad()
    def hold(self) -> None:
        """Zero the originals (and optimizer state) at masked positions."""
        for name in self.names:
            m = mask_of(self.model, name)
            if m is None:
                continue
            p = original(self.model, name)
            p.masked_fill_(~m.mask, 0.0)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if isinstance(state.get(k), torch.Tensor) and state[k].shape == p.shape:
                    state[k].masked_fill_(~m.mask, 0.0)

    def __call__(self, trainer) -> None:  # a Trainer.after_step hook
        self.hold()


class AGPPruner(MaskHolder):
    """AGP schedule over ``targets``: masks at round e = step / every, e = 0..rounds."""

    def __init__(self, model: nn.Module, targets: Targets, every: int, rounds: int,
                 optimizer: torch.optim.Optimizer | None = None):
        super().__init__(model, list(targets), optimizer)
        self.targets, self.every, self.rounds = dict(targets), every, rounds

    def sparsity(self, name: str, e: int) -> float:
        s_i, s_f = self.targets[name]
        return agp_sparsity(s_i, s_f, e, self.rounds)

    @torch.no_grad()
    def update(self, e: int) -> None:
        """Recompute every mask for round ``e`` from the originals' magnitudes."""
        for name in self.names:
            set_mask(self.model, name, magnitude_mask(original(self.model, name), self.sparsity(name, e)))
        self.hold()

    def start(self, step: int) -> None:
        """Attach the masks: round 0 at step 0, else (resuming) ``original != 0`` as saved."""
        if step == 0:
            self.update(0)
        else:
            for name in self.names:
                set_mask(self.model, name, original(self.model, name) != 0)
        self.model.register_state_dict_post_hook(_plain_keys)

    def __call__(self, trainer) -> None:
        step = trainer.step
        if step % self.every == 0 and 0 < step // self.every <= self.rounds:
            self.update(step // self.every)
            log.info("step %d: masks of round %d/%d", step, step // self.every, self.rounds)
        else:
            self.hold()

    def measured(self) -> dict[str, float]:
        """Sparsity of each effective (masked) tensor."""
        with torch.no_grad():
            out = {}
            for n in self.names:
                module, attr = locate(self.model, n)
                w = getattr(module, attr)
                out[n] = 1.0 - torch.count_nonzero(w).item() / w.numel()
            return out
