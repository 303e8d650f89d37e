"""Packed export of a quantized TransformerLM: ``packed.safetensors``, and its loader.

A `safetensors <https://huggingface.co/docs/safetensors>`_ file, so any safetensors reader opens it.
Per tensor of the plain TransformerLM state dict (the tied tables once, as ``embed.tables.i.weight``):

* a quantized weight ``<name>``: ``<name>.codes`` (uint8: the nonzero codes in C order, or all ``numel``
  codes when there is no mask, each a b-bit two's complement integer, bits packed least significant
  first), ``<name>.mask`` (uint8, ``numel`` bits, ``np.packbits`` little bit order, 1 = nonzero code;
  left out when a mask would cost more than the zero codes) and ``<name>.scales`` (fp32, one per output
  channel, or one). value = code x scale, exactly.
* ``<name>`` itself, fp32: the small tensors the quantizer leaves alone (position tables, LayerNorms,
  the training cache's two scalars).
* ``activations``: fp32 (n, 3), (scale, min, max) per activation quantizer.

The metadata (strings, JSON values) holds ``format``, ``bits``, ``act_bits``, ``model_config``,
``cache_config``, ``quant`` (the quantization settings of the run), ``lineage``, ``layout`` (name ->
shape, axis, nnz of each quantized weight) and ``act_names``. :func:`load_packed` rebuilds a
TransformerLM whose weights are bit-identical to the fake-quantized model's effective weights, with the
activation quantizers at their calibrated scales (eval mode), so it evaluates to exactly the same loss.
The legacy ``model.mnq`` files still load (:func:`micronet.compress.checkpoint.load_export`, :mod:`micronet.compress.mnq`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as st_save
from torch import nn

from micronet.compress.prune import locate
from micronet.compress.quantize import (WeightQuant, act_quantizers, attach_act_quantizers, levels, prepare,
                                       quantized_weights)
from micronet.model.cache import CacheConfig, attach_cache, model_cache
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.config import MicronetError, as_dict
from micronet.runs.results import atomic_write_bytes

FORMAT = "micronet-packed-1"
_CHUNK = 1 << 20  # values packed per numpy pass (bounds the (n, bits) temporaries)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed integers (|code| < 2^(bits-1)) -> bits-bit two's complement, packed LSB first."""
    shifts = np.arange(bits, dtype=np.uint64)
    u_all = (codes.astype(np.int64).reshape(-1) & ((1 << bits) - 1)).astype(np.uint64)
    bit_rows = [((u_all[a : a + _CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
                for a in range(0, len(u_all), _CHUNK)]  # each (n_chunk * bits,), LSB first
    out = np.concatenate(bit_rows) if bit_rows else np.zeros(0, np.uint8)
    return np.packbits(out, bitorder="little").tobytes()


def unpack_codes(buf: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (n,) int64."""
    flat = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: n * bits]
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    out = np.concatenate([flat[a * bits : (a + _CHUNK) * bits].reshape(-1, bits).astype(np.int64) @ weights
                          for a in range(0, n, _CHUNK)]) if n else np.zeros(0, np.int64)
    return np.where(out >= 1 << (bits - 1), out - (1 << bits), out)


def plain_names(model: nn.Module) -> list[str]:
    """Sorted keys of the plain TransformerLM state dict behind ``model`` (parametrizations undone,
    masks and activation quantizers left out)."""
    names = []
    for key in model.state_dict():
        m = re.fullmatch(r"(.*)\.parametrizations\.([^.]+)\.original", key)
        if m:
            names.append(f"{m.group(1)}.{m.group(2)}")
        elif ".parametrizations." not in key and not re.search(r"(^|\.)act_(quant|probs)\.", key):
            names.append(key)
    return sorted(names)


def effective(model: nn.Module, name: str) -> torch.Tensor:
    """The value a forward pass uses (masks and quantization applied)."""
    module, attr = locate(model, name)
    return getattr(module, attr).detach()


def weight_scale(model: nn.Module, name: str) -> torch.Tensor:
    """The scale(s) the :class:`WeightQuant` of ``name`` uses: computed on its input (masked original)."""
    module, attr = locate(model, name)
    x = module.parametrizations[attr].original
    for p in module.parametrizations[attr]:
        if isinstance(p, WeightQuant):
            return p.scale(x)
        x = p(x)
    raise MicronetError(f"{name} has no weight quantizer")


def weight_codes(model: nn.Module, name: str, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int64, the weight's shape) and scales ((out,) or ()) of quantized weight ``name``;
    checks that the effective weight is exactly code x scale within the b-bit range."""
    w = effective(model, name).float().cpu()
    s = weight_scale(model, name).float().cpu()
    sb = broadcast_scales(s, w.dim(), per_channel)
    codes = torch.round(w / sb)
    if codes.abs().max() > levels(bits) or not torch.equal(codes * sb + 0.0, w):
        raise MicronetError(f"{name}: weights are not code x scale within +-{levels(bits)} (not quantized at {bits} bits?)")
    return codes.to(torch.int64), s


def broadcast_scales(scales: torch.Tensor, dim: int, per_channel: bool) -> torch.Tensor:
    """Scales shaped to multiply codes of ``dim`` dimensions: (out, 1, ...) per channel, () per tensor."""
    return scales.reshape(-1, *[1] * (dim - 1)) if per_channel else scales.reshape(())


def model_cache_config(model: nn.Module) -> dict:
    """The :class:`CacheConfig` (as a dict) that rebuilds ``model``'s training-cache parameters."""
    cache = model_cache(model)
    if cache is None:
        return as_dict(CacheConfig())
    return as_dict(CacheConfig(n_cache=cache.n_cache, learnable=isinstance(cache.theta_param, nn.Parameter)))


def act_records(model: nn.Module) -> tuple[list[str], np.ndarray]:
    """Names and (scale, min, max) fp32 rows of ``model``'s activation quantizers, in their fixed order."""
    acts = act_quantizers(model)
    data = np.array([[float(q.scale.reshape(-1)[0]), float(q.min_val), float(q.max_val)] for _, q in acts],
                    dtype=np.float32).reshape(-1, 3)
    return [n for n, _ in acts], data


def set_act_quantizers(model: TransformerLM, act_bits: int, names: list[str], data: torch.Tensor, where: str) -> None:
    """Attach activation quantizers to ``model`` and fix them at exported (scale, min, max) rows."""
    attach_act_quantizers(model, act_bits)
    acts = act_quantizers(model)
    if [n for n, _ in acts] != list(names):
        raise MicronetError(f"{where}: activation quantizers do not match this model's")
    with torch.no_grad():
        for (_, q), (scale, lo, hi) in zip(acts, data.tolist()):
            q.scale.fill_(scale)
            q.zero_point.zero_()
            q.min_val.fill_(lo)
            q.max_val.fill_(hi)


def export_packed(model: TransformerLM, path: Path, quant: dict, lineage: dict | None = None) -> int:
    """Write ``model`` (prepared by :func:`micronet.compress.quantize.prepare`) to ``path`` as packed safetensors,
    atomically; returns the file's size in bytes."""
    bits = int(quant["bits"])
    qnames = quantized_weights(model)
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    with torch.no_grad():
        for name in plain_names(model):
            if name not in qnames:
                tensors[name] = effective(model, name).float().cpu().numpy()
                continue
            codes, s = weight_codes(model, name, bits, qnames[name])
            c = codes.numpy().reshape(-1)
            nz = c != 0
            nnz = int(nz.sum())
            use_mask = c.size + nnz * bits < c.size * bits  # the mask costs numel bits, each zero code b bits
            if use_mask:
                tensors[f"{name}.mask"] = np.packbits(nz, bitorder="little")
            tensors[f"{name}.codes"] = np.frombuffer(pack_codes(c[nz] if use_mask else c, bits), np.uint8)
            tensors[f"{name}.scales"] = s.reshape(-1).numpy()
            layout[name] = {"shape": list(codes.shape), "axis": 0 if qnames[name] else None, "nnz": nnz}
    act_names, tensors["activations"] = act_records(model)
    meta = {"format": FORMAT, "bits": bits, "act_bits": int(quant["act_bits"]), "model_config": as_dict(model.cfg),
            "cache_config": model_cache_config(model), "quant": quant, "lineage": lineage, "layout": layout,
            "act_names": act_names}
    blob = st_save(tensors, metadata={k: json.dumps(v, separators=(",", ":")) for k, v in meta.items()})
    atomic_write_bytes(Path(path), blob)
    if not same_weights(model, load_packed(Path(path))):
        raise MicronetError(f"{path} does not reproduce the quantized weights (export bug)")
    return len(blob)


def requantize(ref: TransformerLM, bits: int, act_bits: int, masked: list[str],
               ema: float = 0.999) -> tuple[TransformerLM, dict]:
    """A fake-quantized model (:func:`micronet.compress.quantize.prepare`) rebuilt from ``ref``, a dequantized
    export (:func:`load_packed`, a legacy ``model.mnq``): its weights, a mask of the nonzeros on each ``masked``
    weight, its activation ranges; eval mode, checked bit-identical to ``ref``. Returns it and ``ckpt["quant"]``."""
    model = TransformerLM(ref.cfg)
    attach_cache(model, CacheConfig(**model_cache_config(ref)))
    with torch.no_grad():
        dense = {n: effective(ref, n).clone() for n in plain_names(ref)}
    model.load_state_dict(dense)
    record = prepare(model, bits, act_bits, ema, {n: dense[n] != 0 for n in masked})
    refs = dict(act_quantizers(ref))
    for name, q in act_quantizers(model):  # the same names: attach_act_quantizers' fixed order
        q.load_state_dict(refs[name].state_dict())
    model.eval()
    if not same_weights(model, ref):
        raise MicronetError("the rebuilt quantized model differs from the export it was rebuilt from")
    return model, record


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata (JSON values decoded) of a safetensors file; a bad file is one clear error."""
    try:
        with safe_open(str(path), framework="np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, ValueError, OSError) as e:
        raise MicronetError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, meta


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:  # a plain string (safetensors metadata values are strings)
        return value


def load_packed(path: Path) -> TransformerLM:
    """Rebuild the exported model: dequantized weights, fixed activation quantizers, eval mode."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise MicronetError(f"{path} is not a micronet packed export (format {meta.get('format')!r})")
    model = TransformerLM(ModelConfig(**meta["model_config"]))
    attach_cache(model, CacheConfig(**meta["cache_config"]))
    bits, state = int(meta["bits"]), {}
    for name in plain_names(model):
        if name not in meta["layout"]:
            state[name] = torch.from_numpy(tensors[name].copy())
            continue
        t = meta["layout"][name]
        numel = int(np.prod(t["shape"], dtype=np.int64))
        if f"{name}.mask" in tensors:
            nz = np.unpackbits(tensors[f"{name}.mask"], bitorder="little")[:numel].astype(bool)
            codes = np.zeros(numel, np.int64)
            codes[nz] = unpack_codes(tensors[f"{name}.codes"].tobytes(), bits, int(t["nnz"]))
        else:
            codes = unpack_codes(tensors[f"{name}.codes"].tobytes(), bits, numel)
        scales = torch.from_numpy(tensors[f"{name}.scales"].copy())
        state[name] = torch.from_numpy(codes).view(t["shape"]).float() * broadcast_scales(
            scales, len(t["shape"]), t["axis"] == 0)
    model.load_state_dict(state)
    if meta["act_names"]:
        set_act_quantizers(model, int(meta["act_bits"]), meta["act_names"],
                           torch.from_numpy(tensors["activations"].copy()), str(path))
    return model.eval()


def same_weights(a: TransformerLM, b: TransformerLM) -> bool:
    """Bit-identical effective weights and activation scales."""
    names = plain_names(a)
    if names != plain_names(b):
        return False
    if not all(torch.equal(effective(a, n).cpu(), effective(b, n).cpu()) for n in names):
        return False
    qa, qb = act_quantizers(a), act_quantizers(b)
    return len(qa) == len(qb) and all(torch.equal(x.scale.cpu(), y.scale.cpu()) for (_, x), (_, y) in zip(qa, qb))


__all__ = ["export_packed", "load_packed", "pack_codes", "read_safetensors", "requantize", "same_weights",
           "unpack_codes", "weight_codes"]
