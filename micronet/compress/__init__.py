"""Compression: pruning masks and the AGP schedule, sensitivity analysis, fake quantization, the packed
``packed.safetensors`` export (legacy ``model.mnq`` reader), released-model files, fast CPU inference,
and rebuilding any checkpoint's model.

    from micronet.compress import build_fast_model, load_export, load_model
"""

from micronet.compress.checkpoint import load_export, load_model, model_from_checkpoint
from micronet.compress.export import export_packed, load_packed, same_weights
from micronet.compress.fast_infer import build_fast_model
from micronet.compress.mnq import convert_mnq, load_mnq
from micronet.compress.prune import AGPPruner, PruneConfig, magnitude_mask, prunable_names
from micronet.compress.quantize import calibrate, prepare, prepare_from_checkpoint
from micronet.compress.schedules import final_densities, prune_targets

__all__ = ["AGPPruner", "PruneConfig", "build_fast_model", "calibrate", "convert_mnq", "export_packed",
           "final_densities", "load_export", "load_mnq", "load_model", "load_packed", "magnitude_mask",
           "model_from_checkpoint", "prepare", "prepare_from_checkpoint", "prunable_names", "prune_targets",
           "same_weights"]
