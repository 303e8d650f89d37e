"""Symmetric uniform N-bit fake quantization of weights and activations (spec section 6).

* weights: ``2^(b-1) - 1`` levels each side, zero point 0; Linear weights per output channel, the tied
  tables and every bias per tensor (``torch.nn.utils.parametrize`` + ``torch.fake_quantize_*``, a
  straight-through estimator). Scales are ``max|w| / (2^(b-1) - 1)`` rounded *up* to 32 - b leading
  bits (the low min(b, 23) mantissa bits zero): never clips, and code x scale is exact in fp32.
* activations: a per-tensor symmetric :class:`ActQuant` (EMA (0.999) min/max, ``torch.fake_quantize_*``)
  at 7 points per layer (LN1 out, qkv out, attention probabilities, attn.V, LN2 out, ReLU out, FFN out) plus the
  final hidden state; they observe only in training mode. Not quantized: position tables, LayerNorms,
  tail projections' outputs, logits, cache maths.
* pruning masks (zeros of a pruned parent) are kept as :class:`micronet.compress.prune.Mask`
  parametrizations under the quantizer, so pruned weights stay exactly 0.

:func:`prepare` puts the structure on a model and returns the ``ckpt["quant"]`` record, from which
:func:`prepare_from_checkpoint` (called by :func:`micronet.compress.checkpoint.load_model`) rebuilds it;
:func:`calibrate` sets the activation ranges from a few training batches. The stage is
:mod:`micronet.quantize`; the packed export ``packed.safetensors`` :mod:`micronet.compress.export`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from micronet.compress.prune import locate, set_mask
from micronet.data.batches import sample_batch
from micronet.model.transformer import TransformerLM
from micronet.runs.config import ConfigError

TABLE_SCALES = "tensor"  # the tied tables have one scale each (micronet.scoring.counts' table_scales)


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
    """Per-tensor symmetric activation fake quantizer; EMA min/max updated only in training mode.

    The numerics of the ``torch.ao`` FakeQuantize + MovingAverageMinMaxObserver pair it replaces: the
    first observed batch sets (min, max), later ones move them by ``1 - ema`` of the way; the scale is
    ``max(-min, max, 0) / L`` (at least fp32 eps, 1 before any observation), zero point 0.
    Buffers: ``scale`` (1,), ``zero_point`` (1,) int32, ``min_val``/``max_val`` () (+-inf before any).
    """

    def __init__(self, bits: int, ema: float = 0.999):
        super().__init__()
        self.bits, self.averaging_constant = bits, 1.0 - ema
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the EMA range and the scale from ``x``."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach().float())
        if self.min_val == float("inf") and self.max_val == float("-inf"):  # nothing observed yet
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.copy_(self.min_val + self.averaging_constant * (lo - self.min_val))
            self.max_val.copy_(self.max_val + self.averaging_constant * (hi - self.max_val))
        amax = torch.max(-torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0))
        self.scale.copy_(torch.clamp(amax / float(levels(self.bits)), min=torch.finfo(torch.float32).eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        L = levels(self.bits)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -L, L)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch's signature)
        """Checkpoints written with the torch.ao FakeQuantize (``<prefix>fq.*`` keys) load too."""
        for new, old in (("scale", "fq.scale"), ("zero_point", "fq.zero_point"),
                         ("min_val", "fq.activation_post_process.min_val"),
                         ("max_val", "fq.activation_post_process.max_val")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old).reshape(getattr(self, new).shape)
        for old in ("fq.fake_quant_enabled", "fq.observer_enabled", "fq.activation_post_process.eps"):
            state_dict.pop(prefix + old, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
    rng = np.random.default_rng(seed)
    model.eval()
    for _, q in act_quantizers(model):
        q.train()
    for _ in range(batches):
        x, _, _ = sample_batch(data, batch_size, chunk_len, rng)
        model(x.to(device))
    model.eval()
    return batches * batch_size * chunk_len
