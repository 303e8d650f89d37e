"""Packed export of a quantized TransformerLM: ``model.mnq``, and its loader.

File layout (little endian)::

    0       b"MNQ1"              magic, format 1
    4       uint32 H             header length in bytes
    8       H bytes              UTF-8 JSON header
    8 + H   payload              byte sections, addressed as [offset, nbytes] from the payload start

Header: ``{"format": 1, "bits": b, "act_bits": a, "model_config": {...}, "cache_config": {...},
"tensors": [...], "act": {"names": [...], "data": [offset, nbytes]}}``. One entry per tensor of the
plain TransformerLM state dict (the tied tables once, as ``embed.tables.i.weight``):

* ``{"name", "shape", "kind": "q", "axis": 0 | null, "nnz", "mask", "codes", "scales"}``: a quantized
  weight. ``codes``: the ``nnz`` nonzero codes in C order (all ``numel`` codes when ``mask`` is null), each
  a b-bit two's complement integer, bits packed least significant first. ``mask``: ``numel`` bits
  (``np.packbits``, little bit order; 1 = nonzero code) or null when a mask would cost more than the zero
  codes. ``scales``: fp32, one per output channel (``axis`` 0) or one. value = code x scale, exactly.
* ``{"name", "shape", "kind": "f32", "data"}``: raw fp32 (position tables, LayerNorms, the training
  cache's two scalars): the small tensors the quantizer leaves alone.
* ``act.data``: fp32 (scale, min, max) per activation quantizer, in ``act.names`` order.

:func:`load_mnq` rebuilds a TransformerLM whose weights are bit-identical to the fake-quantized model's
effective weights, with the activation quantizers at their calibrated scales (eval mode), so it
evaluates to exactly the same loss.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from micronet.compress.prune import locate
from micronet.compress.quantize import WeightQuant, act_quantizers, attach_act_quantizers, levels, quantized_weights
from micronet.model.cache import CacheConfig, attach_cache, model_cache
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.config import MicronetError, as_dict
from micronet.runs.results import atomic_write_bytes

MAGIC = b"MNQ1"
_CHUNK = 1 << 20  # values packed per numpy pass (bounds the (n, bits) temporaries)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed integers (|code| < 2^(bits-1)) -> bits-bit two's complement, packed LSB first."""
    out = []
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


def _cache_config(model: nn.Module) -> dict:
    cache = model_cache(model)
    if cache is None:
        return as_dict(CacheConfig())
    return as_dict(CacheConfig(n_cache=cache.n_cache, learnable=isinstance(cache.theta_param, nn.Parameter)))


def export_mnq(model: TransformerLM, path: Path, quant: dict) -> int:
    """Write ``model`` (prepared by :func:`micronet.compress.quantize.prepare`) to ``path``; returns its size in bytes."""
    bits = int(quant["bits"])
    L = levels(bits)
    qnames = quantized_weights(model)
    sections: list[bytes] = []
    offset = 0

    def add(data: bytes) -> list[int]:
        nonlocal offset
        sections.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    entries = []
    with torch.no_grad():
        for name in plain_names(model):
            w = effective(model, name).float().cpu()
            if name not in qnames:
                entries.append({"name": name, "shape": list(w.shape), "kind": "f32",
                                "data": add(w.numpy().astype("<f4").tobytes())})
                continue
            per_channel = qnames[name]
            s = weight_scale(model, name).float().cpu()
            sb = s.view(-1, *[1] * (w.dim() - 1)) if per_channel else s
            codes = torch.round(w / sb)
            if codes.abs().max() > L or not torch.equal(codes * sb + 0.0, w):
                raise MicronetError(f"{name}: weights are not code x scale within +-{L} (not quantized at {bits} bits?)")
            c = codes.to(torch.int64).numpy().reshape(-1)
            nz = c != 0
            nnz = int(nz.sum())
            use_mask = c.size + nnz * bits < c.size * bits  # the mask costs numel bits, each zero code b bits
            entries.append({"name": name, "shape": list(w.shape), "kind": "q", "axis": 0 if per_channel else None,
                            "nnz": nnz, "mask": add(np.packbits(nz, bitorder="little").tobytes()) if use_mask else None,
                            "codes": add(pack_codes(c[nz] if use_mask else c, bits)),
                            "scales": add(s.reshape(-1).numpy().astype("<f4").tobytes())})
        acts = act_quantizers(model)
        act = np.array([[float(q.fq.scale.reshape(-1)[0]), float(q.fq.activation_post_process.min_val),
                         float(q.fq.activation_post_process.max_val)] for _, q in acts], dtype="<f4")
    header = {"format": 1, "bits": bits, "act_bits": int(quant["act_bits"]), "model_config": as_dict(model.cfg),
              "cache_config": _cache_config(model), "tensors": entries,
              "act": {"names": [n for n, _ in acts], "data": add(act.tobytes())}}
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = MAGIC + struct.pack("<I", len(head)) + head + b"".join(sections)
    atomic_write_bytes(Path(path), blob)
    return len(blob)


def load_mnq(path: Path) -> TransformerLM:
    """Rebuild the exported model: dequantized weights, fixed activation quantizers, eval mode."""
    raw = Path(path).read_bytes()
    if raw[:4] != MAGIC:
        raise MicronetError(f"{path} is not a model.mnq file (bad magic)")
    (hlen,) = struct.unpack("<I", raw[4:8])
    h = json.loads(raw[8 : 8 + hlen].decode())
    payload = memoryview(raw)[8 + hlen :]

    def section(ref: list[int]) -> bytes:
        return bytes(payload[ref[0] : ref[0] + ref[1]])

    model = TransformerLM(ModelConfig(**h["model_config"]))
    attach_cache(model, CacheConfig(**h["cache_config"]))
    bits, state = int(h["bits"]), {}
    for t in h["tensors"]:
        shape, numel = t["shape"], int(np.prod(t["shape"], dtype=np.int64))
        if t["kind"] == "f32":
            state[t["name"]] = torch.from_numpy(np.frombuffer(section(t["data"]), "<f4").copy()).view(shape)
            continue
        if t["mask"] is None:
            codes = unpack_codes(section(t["codes"]), bits, numel)
        else:
            nz = np.unpackbits(np.frombuffer(section(t["mask"]), np.uint8), bitorder="little")[:numel].astype(bool)
            codes = np.zeros(numel, np.int64)
            codes[nz] = unpack_codes(section(t["codes"]), bits, int(t["nnz"]))
        scales = torch.from_numpy(np.frombuffer(section(t["scales"]), "<f4").copy())
        sb = scales.view(-1, *[1] * (len(shape) - 1)) if t["axis"] == 0 else scales.reshape(())
        state[t["name"]] = torch.from_numpy(codes).view(shape).float() * sb
    model.load_state_dict(state)
    names = h["act"]["names"]
    if names:
        attach_act_quantizers(model, int(h["act_bits"]))
        data = np.frombuffer(section(h["act"]["data"]), "<f4").reshape(-1, 3)
        acts = act_quantizers(model)
        if [n for n, _ in acts] != names:
            raise MicronetError(f"{path}: activation quantizers do not match this model's")
        with torch.no_grad():
            for (_, q), (scale, lo, hi) in zip(acts, data):
                q.fq.scale.fill_(float(scale))
                q.fq.zero_point.zero_()
                q.fq.activation_post_process.min_val.fill_(float(lo))
                q.fq.activation_post_process.max_val.fill_(float(hi))
    return model.eval()


def same_weights(a: TransformerLM, b: TransformerLM) -> bool:
    """Bit-identical effective weights and activation scales."""
    names = plain_names(a)
    if names != plain_names(b):
        return False
    if not all(torch.equal(effective(a, n).cpu(), effective(b, n).cpu()) for n in names):
        return False
    qa, qb = act_quantizers(a), act_quantizers(b)
    return len(qa) == len(qb) and all(torch.equal(x.fq.scale.cpu(), y.fq.scale.cpu()) for (_, x), (_, y) in zip(qa, qb))


__all__ = ["export_mnq", "load_mnq", "pack_codes", "same_weights", "unpack_codes"]
