"""Trained models for use elsewhere: ``model.safetensors`` + ``config.json``, readable with safetensors alone.

    python -m micronet.release name=<run> [step=S] [out=<dir>]        # the stage; default out: exports/<run>_step<S>/
    export_model("prune0.358_wt2_8.3M", 300, "exports/wt2_pruned")   # the same from Python; any run: fp32,
    model = load_exported("exports/wt2_pruned")                       # pruned or quantized -> TransformerLM

``model.safetensors`` holds every tensor of the plain TransformerLM state dict (masks applied; the tied
tables once, as ``embed.tables.i.weight``): ``<name>`` in fp32, or for a quantized run's quantized
weights ``<name>.codes`` (int8 / int16 / int32 by bit width, the weight's shape) and ``<name>.scale``
(fp32, (out, 1, ...) per output channel or () per tensor, so ``codes * scale`` broadcasts), whose product is
the dense weight exactly. Without micronet (README)::

    from safetensors.numpy import load_file
    t = load_file("exports/my_model/model.safetensors")
    w = {k.removesuffix(".codes"): v * t[k[:-6] + ".scale"] if k.endswith(".codes") else v for k, v in t.items() if not k.endswith(".scale")}

``config.json``: ``format``, ``model_config`` and ``cache_config`` (the TransformerLM and its training
cache), ``data_config`` (the corpus it was trained on), ``quant`` (null, or the quantization settings with ``act_quantizers``: name -> [scale, min, max]
of each activation fake quantizer), ``source`` (run, step, lineage, code version) and ``weights`` (the weights file).

``export_model(..., packed=True)`` writes a quantized run's weights as ``packed.safetensors`` instead
(:func:`micronet.compress.export.export_packed`: b-bit codes packed, a bit mask where that is smaller;
5.9 MB instead of 13.5 MB for 6.76M weights at 9 bits and 35.8% sparsity): what releases ship.
:func:`quantized_state` turns such a folder back into the state of the quantized run it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save

from micronet.model.cache import CacheConfig, attach_cache
from micronet.runs.config import MicronetError, as_dict
from micronet.compress.checkpoint import load_model
from micronet.compress.export import (act_records, broadcast_scales, effective, export_packed, load_packed,
                                     model_cache_config, plain_names, read_safetensors, requantize,
                                     set_act_quantizers, weight_codes)
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.compress.quantize import quantized_weights
from micronet.runs.results import RunDir, atomic_write_bytes, code_version, write_json

FORMAT = "micronet-model-1"
WEIGHTS, CONFIG, PACKED = "model.safetensors", "config.json", "packed.safetensors"


def _code_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)


def _tensors(model: TransformerLM, quant: dict | None) -> dict[str, np.ndarray]:
    """``model.safetensors``' tensors: fp32 values, a quantized weight as ``.codes`` + ``.scale``."""
    qnames = quantized_weights(model) if quant else {}
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name in plain_names(model):
            if name in qnames:
                codes, s = weight_codes(model, name, int(quant["bits"]), qnames[name])
                tensors[f"{name}.codes"] = codes.numpy().astype(_code_dtype(int(quant["bits"])))
                tensors[f"{name}.scale"] = broadcast_scales(s, codes.dim(), qnames[name]).numpy()
            else:
                tensors[name] = effective(model, name).float().cpu().numpy()
    return tensors


def export_model(run: str | RunDir, step: int | None, out_dir: str | Path, packed: bool = False) -> Path:
    """Write step ``step`` (None: newest) of ``run`` to ``out_dir``/{model.safetensors, config.json}; returns out_dir.
    ``packed``: a quantized run's weights go to ``packed.safetensors`` (bit-packed codes) instead."""
    rd = run if isinstance(run, RunDir) else RunDir(run)
    model, ckpt = load_model(rd, step)
    quant, out = ckpt.get("quant"), Path(out_dir)
    if quant and packed:
        weights = PACKED
        export_packed(model, out / PACKED, quant, ckpt.get("lineage"))  # verified by reloading
    else:
        weights = WEIGHTS
        atomic_write_bytes(out / WEIGHTS, st_save(_tensors(model, quant), metadata={"format": FORMAT}))
    if quant:
        names, data = act_records(model)
        quant = {**quant, "act_quantizers": dict(zip(names, data.tolist()))}
    write_json(out / CONFIG, {"format": FORMAT, "weights": weights, "model_config": as_dict(model.cfg),
                              "cache_config": model_cache_config(model), "quant": quant,
                              "data_config": ckpt.get("data_config"),
                              "source": {"run": rd.name, "step": int(ckpt["step"]), "lineage": ckpt.get("lineage"),
                                         "code": code_version()}})
    return out


def dense_weights(out_dir: str | Path) -> dict[str, torch.Tensor]:
    """The exported state dict with every quantized weight as codes x scale (fp32)."""
    tensors, _ = read_safetensors(Path(out_dir) / WEIGHTS)
    out = {}
    for key, value in tensors.items():
        if key.endswith(".codes"):
            dense = value.astype(np.float64) * tensors[key[:-6] + ".scale"]  # exact, then fp32 as the model held it
            out[key[:-6]] = torch.from_numpy(dense.astype(np.float32))
        elif not key.endswith(".scale"):
            out[key] = torch.from_numpy(value.copy())
    return out


def load_exported(out_dir: str | Path) -> TransformerLM:
    """The TransformerLM of an :func:`export_model` directory (activation quantizers at their exported
    ranges for a quantized run, so it evaluates like the run's fake-quantized model), eval mode."""
    path = Path(out_dir) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MicronetError(f"{path}: not an exported model's config ({e})") from None
    if cfg.get("format") != FORMAT:
        raise MicronetError(f"{path}: not a micronet model export (format {cfg.get('format')!r})")
    if cfg.get("weights") == PACKED:
        return load_packed(Path(out_dir) / PACKED)
    model = TransformerLM(ModelConfig(**cfg["model_config"]))
    attach_cache(model, CacheConfig(**cfg["cache_config"]))
    model.load_state_dict(dense_weights(out_dir))
    quant = cfg.get("quant")
    if quant and quant.get("act_quantizers"):
        acts = quant["act_quantizers"]
        set_act_quantizers(model, int(quant["act_bits"]), list(acts), torch.tensor(list(acts.values())), str(path))
    return model.eval()


def quantized_state(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and ``ckpt["quant"]`` record of a quantized export, as its run held them
    (:func:`micronet.compress.export.requantize`: each masked weight's mask = its nonzero codes, so the
    scorer counts the same nonzeros; checked bit-identical to the export)."""
    out = Path(out_dir)
    quant = {k: v for k, v in (json.loads((out / CONFIG).read_text()).get("quant") or {}).items()
             if k != "act_quantizers"}
    if not quant:
        raise MicronetError(f"{out} holds a full-precision model, not a quantized one")
    model, _ = requantize(load_exported(out), int(quant["bits"]), int(quant["act_bits"]), quant.get("masked", []),
                          float(quant.get("ema", 0.999)))
    return model.state_dict(), quant


__all__ = ["CONFIG", "FORMAT", "PACKED", "WEIGHTS", "dense_weights", "export_model", "load_exported", "quantized_state"]
