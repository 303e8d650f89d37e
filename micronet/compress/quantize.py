"""Quantize stage: symmetric uniform N-bit weights and activations, calibration or QAT, packed export.

    python -m micronet.quantize name=<run> bits=<b> [act_bits=<a>] [n_cache=N] [step=S] [quant.steps=K]
    python -m micronet.quantize -m name=<run> bits=8,9,10

Creates ``results/quantize_<name>_step<S>_cache<N>_bits<b>/`` (spec section 6):

* weights: ``2^(b-1) - 1`` levels each side, zero point 0; Linear weights per output channel, the tied
  tables and every bias per tensor (``torch.nn.utils.parametrize`` + ``torch.fake_quantize_*``, a
  straight-through estimator). Scales are ``max|w| / (2^(b-1) - 1)`` rounded *up* to 32 - b leading
  bits (the low min(b, 23) mantissa bits zero): never clips, and code x scale is exact in fp32.
* activations: a per-tensor ``torch.ao.quantization.FakeQuantize`` with EMA (0.999) min/max at 7 points
  per layer (LN1 out, qkv out, attention probabilities, attn.V, LN2 out, ReLU out, FFN out) plus the
  final hidden state; they observe only in training mode. Not quantized: position tables, LayerNorms,
  tail projections' outputs, logits, cache maths.
* pruning masks (zeros of a pruned parent) are kept as :class:`micronet.prune.Mask` parametrizations
  under the quantizer, so pruned weights stay exactly 0.

``quant.steps <= 1``: calibration (the original's single step): a few training batches in forward mode
set the activation ranges. ``quant.steps > 1``: QAT through :class:`~micronet.train.Trainer`.
The checkpoint holds the parametrized state (full-precision originals, masks, quantizer buffers) and
``ckpt["quant"]``, from which :func:`prepare_from_checkpoint` (called by ``evaluate.load_model``)
rebuilds the structure. The job copies the parent's searched cache parameters, evaluates, writes the
packed export ``model.mnq`` (:mod:`micronet.compress.export`, verified by reloading), scores, and writes
``quantize_step<S>.json`` (export size next to the counted storage).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

from micronet.model.cache import attach_cache, checkpoint_cache_config, read_cache_params, write_cache_params
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import ConfigError, MicronetError, typed
from micronet.data.corpus import DataConfig, load_corpus
from micronet.stagekit.evaluation import pick_device
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.lineage import evaluate_and_score, lineage
from micronet.compress.prune import MaskHolder, locate, set_mask, sparse_masks
from micronet.runs.results import CheckpointError, RunDir, atomic_write_text, code_version, write_json

log = logging.getLogger(__name__)

TABLE_SCALES = "tensor"  # the tied tables have one scale each (micronet.score's table_scales)


def levels(bits: int) -> int:
    """Largest code magnitude: 2^(b-1) - 1 (255 at 9 bits)."""
    return 2 ** (bits - 1) - 1


def check_bits(bits: int, what: str = "bits") -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ConfigError(f"{what} must be an integer in 2..32, got {bits}")


def reduced_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """``amax / L`` rounded up to 32 - b leading bits (low min(b, 23) bits of the fp32 pattern zero).

    A code has at most b - 1 significant bits and the scale at most 24 - b, so code x scale is exact.
    Zero (or subnormal) ranges get scale 1: their codes are all 0.
    """
    s = amax.detach().float() / levels(bits)
    s = torch.where(s >= torch.finfo(torch.float32).tiny, s, torch.ones_like(s))
    low = (1 << min(bits, 23)) - 1
    i = s.contiguous().view(torch.int32)
    return torch.where(i & low != 0, (i | low) + 1, i).view(torch.float32)


class WeightQuant(nn.Module):
    """Parametrization: symmetric fake quantization, per output channel (dim 0) or per tensor."""

    def __init__(self, bits: int, per_channel: bool):
        super().__init__()
        self.bits, self.per_channel = bits, per_channel

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """(out,) per channel or () per tensor."""
        amax = w.detach().abs().flatten(1).amax(1) if self.per_channel else w.detach().abs().amax()
        return reduced_scale(amax, self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        L, s = levels(self.bits), self.scale(w)
        zero = torch.zeros(s.shape, dtype=torch.int32, device=w.device)
        if self.per_channel:
            q = torch.fake_quantize_per_channel_affine(w, s, zero, 0, -L, L)
        else:
            q = torch.fake_quantize_per_tensor_affine(w, s, zero, -L, L)
        return q + 0.0  # -0.0 -> +0.0: the same bits as the dequantized export


class ActQuant(nn.Module):
    """Per-tensor symmetric activation fake quantizer; EMA min/max updated only in training mode."""

    def __init__(self, bits: int, ema: float = 0.999):
        super().__init__()
        L = levels(bits)
        self.fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-L, quant_max=L, dtype=torch.qint32,
                               qscheme=torch.per_tensor_symmetric, averaging_constant=1.0 - ema)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fq.observer_enabled.fill_(int(self.training))
        return self.fq(x)


def quantized_weights(model: TransformerLM) -> dict[str, bool]:
    """Weight name -> per output channel? Linear weights yes; tied tables and biases per tensor."""
    out = {f"embed.tables.{i}.weight": False for i in range(len(model.embed.tables))}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith("cache"):
            out[f"{name}.weight"] = True
            if m.bias is not None:
                out[f"{name}.bias"] = False
    out.update({f"softmax.biases.{i}": False for i in range(len(model.softmax.biases))})
    return out


def _quant_output(module: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
    return module.act_quant(out)


def _quant_input(module: nn.Module, inp: tuple) -> tuple:
    return (module.act_quant(inp[0]), *inp[1:])


def _quant_hidden(module: nn.Module, inp: tuple, out: tuple) -> tuple:
    h, memory = out
    return module.act_quant(h), memory


def attach_act_quantizers(model: TransformerLM, bits: int, ema: float = 0.999) -> int:
    """Insert the 7 per layer + final hidden quantizers (forward hooks); returns how many."""
    for layer in model.layers:
        for m in (layer.ln1, layer.attn.qkv, layer.ln2, layer.ffn[1], layer.ffn[2]):  # outputs
            m.act_quant = ActQuant(bits, ema)
            m.register_forward_hook(_quant_output)
        layer.attn.out.act_quant = ActQuant(bits, ema)  # its input: attn.V
        layer.attn.out.register_forward_pre_hook(_quant_input)
        layer.attn.act_probs = ActQuant(bits, ema)  # attention probabilities (model.py's hook point)
    model.act_quant = ActQuant(bits, ema)  # the final hidden state
    model.register_forward_hook(_quant_hidden)
    return 7 * len(model.layers) + 1


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuant]]:
    """(name, quantizer) in a fixed order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]


def prepare(model: TransformerLM, bits: int, act_bits: int, ema: float = 0.999,
            masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Masks, weight and activation fake quantizers on ``model``; returns the ``ckpt["quant"]`` record."""
    check_bits(bits)
    check_bits(act_bits, "act_bits")
    masks = masks or {}
    for name, keep in masks.items():
        set_mask(model, name, keep)
    for name, per_channel in quantized_weights(model).items():
        module, attr = locate(model, name)
        parametrize.register_parametrization(module, attr, WeightQuant(bits, per_channel))
    n_act = attach_act_quantizers(model, act_bits, ema) if act_bits < 32 else 0
    return {"bits": bits, "act_bits": act_bits, "n_act_quantizers": n_act, "table_scales": TABLE_SCALES,
            "ema": ema, "masked": sorted(masks)}


def prepare_from_checkpoint(model: TransformerLM, quant: dict) -> None:
    """Rebuild a quantized checkpoint's structure so its state dict loads (masks are placeholders)."""
    placeholders = {}
    for name in quant.get("masked", []):
        module, attr = locate(model, name)
        placeholders[name] = torch.ones_like(getattr(module, attr), dtype=torch.bool)
    prepare(model, int(quant["bits"]), int(quant["act_bits"]), float(quant.get("ema", 0.999)), placeholders)


@torch.no_grad()
def calibrate(model: TransformerLM, data: np.ndarray, batches: int, batch_size: int, chunk_len: int,
              seed: int = 0, device: torch.device | str = "cpu") -> int:
    """Set the activation ranges from ``batches`` random training chunks (dropout off); returns tokens seen."""
    from micronet.training.trainer import sample_batch

    rng = np.random.default_rng(seed)
    model.eval()
    for _, q in act_quantizers(model):
        q.train()
    for _ in range(batches):
        x, _, _ = sample_batch(data, batch_size, chunk_len, rng)
        model(x.to(device))
    model.eval()
    return batches * batch_size * chunk_len


# ----------------------------------------------------------------------------- the stage


@dataclass
class QuantConfig:
    """The ``quant`` node: calibration or QAT."""

    steps: int = 1  # <= 1: calibration only (the original's single step); > 1: QAT steps through the Trainer
    calib_batches: int = 4
    calib_batch_size: int = 1
    calib_chunk_len: int = 1152
    ema: float = 0.999  # activation range EMA

    def validate(self) -> None:
        if self.calib_batches < 1 or self.calib_batch_size < 1 or self.calib_chunk_len < 1:
            raise ValueError("quant.calib_batches, calib_batch_size and calib_chunk_len must be positive")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"quant.ema must be in [0, 1), got {self.ema}")


@dataclass
class QuantizeStageConfig:
    """Top-level keys of ``conf/quantize.yaml``."""

    name: str = "???"
    step: int | None = None  # None: newest checkpoint
    bits: int = 9
    act_bits: int | None = None  # None: = bits
    n_cache: int | None = None  # None: the largest searched cache of that step (cache_step<S>_n<N>.yaml), else 0
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    eval_chunk_len: int = 4032
    device: str = "auto"

    def validate(self) -> None:
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if self.n_cache is not None and self.n_cache < 0:
            raise ValueError(f"n_cache must be >= 0, got {self.n_cache}")


def searched_caches(parent: RunDir, step: int) -> list[int]:
    """Cache sizes searched for ``step`` of ``parent`` (its ``cache_step<S>_n<N>.yaml`` files), ascending."""
    return sorted(int(p.stem.rsplit("_n", 1)[1]) for p in parent.path.glob(f"cache_step{step}_n*.yaml"))


def _searched_cache(parent: RunDir, step: int) -> int:
    found = searched_caches(parent, step)
    return found[-1] if found else 0


def quantized_name(parent: str, step: int, n_cache: int, bits: int) -> str:
    """Results name of step ``step`` of ``parent`` quantized to ``bits`` (also used by micronet.pipeline)."""
    return f"quantize_{parent}_step{int(step)}_cache{int(n_cache)}_bits{int(bits)}"


def _plain_model(ckpt: dict) -> TransformerLM:
    model = TransformerLM(ModelConfig(**ckpt["model_config"]))
    attach_cache(model, checkpoint_cache_config(ckpt))
    model.load_state_dict(ckpt["model"])
    return model


def run(cfg: DictConfig) -> dict:
    """Quantize a run's checkpoint into its own results dir; returns the quantize summary JSON."""
    from micronet.compress.export import export_mnq, load_mnq, same_weights
    from micronet.training.trainer import OptimConfig, TrainConfig, Trainer, truncate_csv

    top = {k: cfg.get(k) for k in QuantizeStageConfig.__dataclass_fields__ if k in cfg}
    qs = typed(QuantizeStageConfig, top, "quantize")
    qc = typed(QuantConfig, cfg.get("quant"), "quant")
    act_bits = qs.act_bits if qs.act_bits is not None else qs.bits
    parent = RunDir(qs.name).require()
    ckpt = parent.load(qs.step)
    if ckpt.get("quant"):
        raise ConfigError(f"{parent.name} is already quantized; quantize its full-precision parent")
    pstep = int(ckpt["step"])
    n_cache = qs.n_cache if qs.n_cache is not None else _searched_cache(parent, pstep)
    rd = RunDir(quantized_name(parent.name, pstep, n_cache, qs.bits))
    qat = qc.steps > 1
    with rd.guard("quantize"):
        setup_logging(rd.log_path("quantize"))
        have = rd.steps()
        if have and (max(have) > max(qc.steps, 1) or (not qat and have != [1])):
            raise CheckpointError(f"results/{rd.name} holds checkpoints {have} of other quant.steps; remove it "
                                  f"or use the same settings")
        data_cfg = typed(DataConfig, ckpt["data_config"], "data")
        corpus = load_corpus(data_cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["lineage"] = lineage("quantize", parent, pstep)
        if qat:
            train_cfg = typed(TrainConfig, {**(cfg.get("train") or {}), "steps": qc.steps}, "train")
            trainer = Trainer(rd, train_cfg, typed(OptimConfig, cfg.get("optim"), "optim"),
                              ModelConfig(**ckpt["model_config"]), data_cfg, corpus, resolved,
                              cache_cfg=checkpoint_cache_config(ckpt))
            trainer.model.load_state_dict(ckpt["model"])
            masks = sparse_masks(trainer.model)
            info = prepare(trainer.model, qs.bits, act_bits, qc.ema, masks)
            trainer.after_step = (*trainer.after_step, MaskHolder(trainer.model, list(masks), trainer.optimizer))
            trainer.extra_state = {"quant": {**info, "steps": qc.steps}, "lineage": resolved["lineage"]}
            trainer.resume()  # parametrized keys: the structure is in place before loading
            truncate_csv(rd, trainer.step)
            trainer.train()
            if trainer.step < qc.steps:
                print(f"stopped at step {trainer.step}; results in {rd.path}")
                return {}
            model, step = trainer.model, trainer.step
        else:
            device = pick_device(qs.device)
            model = _plain_model(ckpt).to(device)
            info = prepare(model, qs.bits, act_bits, qc.ema, sparse_masks(model))
            tokens = calibrate(model, corpus.train, qc.calib_batches, qc.calib_batch_size, qc.calib_chunk_len,
                               device=device)
            step = 1
            rd.save(step, {"model": model.state_dict(), "model_config": ckpt["model_config"],
                           "data_config": ckpt["data_config"], "cache_config": ckpt.get("cache_config"),
                           "data_manifest": ckpt.get("data_manifest"), "tokens": tokens, "code": code_version(),
                           "quant": {**info, "steps": 1}, "lineage": resolved["lineage"]})
        del ckpt
        log.info("quantized %s step %d: %d-bit weights, %d-bit activations (%d quantizers), %d masked tensors",
                 parent.name, pstep, qs.bits, act_bits, info["n_act_quantizers"], len(info["masked"]))
        resolved["code"] = code_version()
        atomic_write_text(rd.config_path, OmegaConf.to_yaml(resolved))
        if n_cache:
            src = parent.cache_params_path(pstep, n_cache)
            if src.exists():
                lam, theta = read_cache_params(src)
                write_cache_params(rd.cache_params_path(step, n_cache), n_cache, lam, theta,
                                   source=f"{parent.name}/{src.name}")
            else:
                log.warning("%s has no %s: the evaluation cache uses learned or default lambda/theta",
                            parent.name, src.name)
        model.cpu().eval()
        nbytes = export_mnq(model, rd.mnq_path, info)
        if not same_weights(model, load_mnq(rd.mnq_path)):
            raise MicronetError(f"{rd.mnq_path} does not reproduce the quantized weights (export bug)")
        scored = evaluate_and_score(rd.name, step, qs.eval_splits, qs.eval_chunk_len, n_cache, qs.device)
        setup_logging(rd.log_path("quantize"))
        counted = {c: v["params"] * 4 for c, v in scored["conventions"].items()}  # 32-bit equivalents -> bytes
        out = {"name": rd.name, "step": step, "parent": parent.name, "parent_step": pstep, "bits": qs.bits,
               "act_bits": act_bits, "n_act_quantizers": info["n_act_quantizers"], "n_cache": n_cache,
               "qat_steps": qc.steps, "mnq_bytes": nbytes, "counted_bytes": counted,
               "mnq_over_counted": {c: nbytes / v for c, v in counted.items() if v},
               "score": scored["score"], "test_ppl": scored.get("test_ppl")}
        write_json(rd.quantize_path(step), out)
    log.info("%s: model.mnq %s bytes; counted storage %s bytes (paper) / %s (strict)", rd.name, f"{nbytes:,}",
             f"{counted.get('paper', math.nan):,.0f}", f"{counted.get('strict', math.nan):,.0f}")
    print(f"{rd.name} step {step}: score {out['score']:.6f}, model.mnq {nbytes:,} bytes; results in {rd.path}")
    return out


main = stage_main("quantize", run)

if __name__ == "__main__":
    from micronet.compress.quantize import main as canonical_main  # its classes, not __main__'s copies (isinstance)

    canonical_main()
