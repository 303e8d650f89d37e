"""Compression: pruning masks and the AGP schedule, sensitivity analysis, fake quantization, the packed
``model.mnq`` export, fast CPU inference, and rebuilding any checkpoint's model.

    from micronet.compress import build_fast_model, load_model, load_mnq
"""

from micronet.compress.checkpoint import load_model, model_from_checkpoint
from micronet.compress.export import export_mnq, load_mnq, same_weights
from micronet.compress.fast_infer import build_fast_model
from micronet.compress.prune import AGPPruner, PruneConfig, magnitude_mask, prunable_names
from micronet.compress.quantize import calibrate, prepare, prepare_from_checkpoint
from micronet.compress.schedules import final_densities, prune_targets

__all__ = ["AGPPruner", "PruneConfig", "build_fast_model", "calibrate", "export_mnq", "final_densities", "load_mnq",
           "load_model", "magnitude_mask", "model_from_checkpoint", "prepare", "prepare_from_checkpoint",
           "prunable_names", "prune_targets", "same_weights"]
