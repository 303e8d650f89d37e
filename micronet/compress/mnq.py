"""The legacy packed format ``model.mnq`` (written until the safetensors export): its reader.

New exports are ``packed.safetensors`` (:mod:`micronet.compress.export`); this module keeps old files loadable.

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
import struct
from pathlib import Path

import numpy as np
import torch

from micronet.model.cache import CacheConfig, attach_cache
from micronet.runs.config import MicronetError
from micronet.compress.export import effective, export_packed, requantize, set_act_quantizers, unpack_codes
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.compress.quantize import quantized_weights

MAGIC = b"MNQ1"


def is_mnq(path: Path) -> bool:
    """Whether ``path`` starts with the model.mnq magic."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def load_mnq(path: Path) -> TransformerLM:
    """Rebuild an exported model: dequantized weights, fixed activation quantizers, eval mode."""
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
        data = np.frombuffer(section(h["act"]["data"]), "<f4").reshape(-1, 3)
        set_act_quantizers(model, int(h["act_bits"]), names, torch.from_numpy(data.copy()), str(path))
    return model.eval()


def convert_mnq(path: Path, out: Path) -> int:
    """Rewrite a ``model.mnq`` as ``packed.safetensors`` at ``out`` (verified: identical weights and
    activation ranges); returns the new file's size. Zero weights become masks, so they stay zero."""
    header = json.loads(Path(path).read_bytes()[8 : 8 + struct.unpack("<I", Path(path).read_bytes()[4:8])[0]])
    old = load_mnq(path)
    masked = [n for n in quantized_weights(old) if not effective(old, n).all()]
    model, info = requantize(old, int(header["bits"]), int(header["act_bits"]), masked)  # code x scale: the identity
    return export_packed(model, out, {**info, "converted_from": Path(path).name})  # verified by reloading


__all__ = ["convert_mnq", "is_mnq", "load_mnq"]
